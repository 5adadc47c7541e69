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

from .methods import FUSED_MAX_M, RowScaledMethod, dequantize_rows, row_scale

if TYPE_CHECKING:
    from ..layers.linear import Linear

INT8_MAX = 127


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (Wq [N, K] int8, scale [N] float32), round to nearest, symmetric."""
    scale = row_scale(w, INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


dequantize_int8 = dequantize_rows


def int8_linear_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Widen the codes, multiply, scale each output column in float32 (any device)."""
    y = (F.linear(x, q.to(x.dtype)).float() * scale).to(x.dtype)
    return y + bias if bias is not None else y


class Int8LinearMethod(RowScaledMethod):
    """Parameters: weight [N, K] int8, weight_scale [N] float32; quantized from a float checkpoint at
    load, or stored (compressed-tensors int-quantized checkpoints, RowScaledMethod.load)."""

    weight_dtype = torch.int8

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight_int8(w)

    def gemv_max_m(self) -> int:
        return FUSED_MAX_M

    def fallback(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return int8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias)

    def kernel_reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """What kernels/gemv.py computes for x [M, K]: (x . q) * s + b in float32, rounded once to
        x's dtype (the torch path above rounds x . q first)."""
        bias = layer.bias.float() if layer.bias is not None else None
        return int8_linear_reference(x.float(), layer.weight, layer.weight_scale, bias).to(x.dtype)
