"""INT8 weight-only: per-output-channel symmetric scales, no calibration, activations untouched.

    W[n, :] ~= Wq[n, :] * s[n]      Wq int8 in [-127, 127], s = max|W[n, :]| / 127   (float32)
    y[m, n]  = (x[m, :] . Wq[n, :]) * s[n]  (+ b[n])

The scale factors out of the dot product, so the matmul runs on the integer codes widened to the
activation dtype (exact: |q| <= 127 fits bf16's 8-bit significand) and the scale is one multiply per
output. CUDA batches of up to FUSED_MAX_M rows stream the int8 weights through a Triton kernel
(kernels/gemv.py); prefill-sized batches, and CPU workers, widen the codes and call the GEMM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from .. import kernels
from ..errors import ModelLoadError
from .methods import FUSED_MAX_M, LinearMethod, check_shape, new_param

if TYPE_CHECKING:
    from ..layers.linear import Linear

INT8_MAX = 127


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (Wq [N, K] int8, scale [N] float32), round to nearest, symmetric."""
    amax = w.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w.float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().reshape(-1, 1)


def int8_linear_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Widen the codes, multiply, scale each output column in float32 (any device)."""
    y = (F.linear(x, q.to(x.dtype)).float() * scale).to(x.dtype)
    return y + bias if bias is not None else y


class Int8LinearMethod(LinearMethod):
    """Parameters: weight [N, K] int8, weight_scale [N] float32; filled from a float checkpoint."""

    def create_weights(self, layer: Linear) -> None:
        n, k = sum(layer.output_sizes), layer.in_features
        new_param(layer, "weight", (n, k), torch.int8)
        new_param(layer, "weight_scale", (n,), torch.float32)

    def load(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str) -> list[str]:
        if name != "weight" or not tensor.is_floating_point():
            raise ModelLoadError(f"{ck_name}: quantization int8 quantizes float weights at load; got {name}")
        lo, hi = layer.shard_range(shard)
        check_shape(ck_name, tensor, (hi - lo, layer.in_features))
        q, s = quantize_weight_int8(tensor)
        layer.weight.data[lo:hi].copy_(q)
        layer.weight_scale.data[lo:hi].copy_(s)
        return ["weight", "weight_scale"]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if (
            x.is_cuda
            and kernels.AVAILABLE
            and x2.shape[0] <= FUSED_MAX_M
            and x.dtype in (torch.bfloat16, torch.float16)
        ):
            from ..kernels.gemv import gemv

            y = gemv(x2, layer.weight, layer.weight_scale, layer.bias)
        else:
            y = int8_linear_reference(x2, layer.weight, layer.weight_scale, layer.bias)
        return y.reshape(*shape[:-1], y.shape[-1])
