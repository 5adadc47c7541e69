"""FP8 (e4m3) weights with per-output-channel scales; activations quantized per token at run time.

    W[n, :] ~= Wq[n, :] * sw[n]            Wq float8_e4m3fn, sw = max|W[n, :]| / 448   (float32)
    x[m, :] ~= xq[m, :] * sx[m]            dynamic: sx = max|x[m, :]| / 448, every forward
    y[m, n]  = (xq[m, :] . Wq[n, :]) * sx[m] * sw[n]  (+ b[n])

Per-row scales make merged layers trivial: the q, k and v rows of qkv_proj keep their own scales, so
shards concatenate along the output dim with nothing to reconcile.

On CUDA (compute capability >= 8.9) large batches run W8A8 through `torch._scaled_mm` (cuBLASLt /
CUTLASS row-wise scaling); decode batches of <= W8A16_MAX_M rows are bandwidth-bound and stream the
FP8 weights through a Triton kernel that widens them to bf16 in registers (kernels/gemv.py): the
same bytes as W8A8, without rounding the activations. `fp8_linear_reference` is the same math in
float32 on any device (CPU included), choosing per batch size exactly as the CUDA path does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from .. import kernels
from .methods import RowScaledMethod, dequantize_rows, row_scale

if TYPE_CHECKING:
    from ..layers.linear import Linear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# activation scales never go below this (as vLLM): an all-zero row quantizes to zeros, not NaNs
MIN_ACT_SCALE = 1.0 / (FP8_MAX * 512.0)
# decode batches up to this many rows keep bf16 activations (see the module docstring); 0 = W8A8 always.
# Read at every forward (tests and benchmarks set it).
W8A16_MAX_M = 64


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, any device) -> (Wq [N, K] float8_e4m3fn, scale [N] float32)."""
    scale = row_scale(w, FP8_MAX)
    q = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


dequantize_fp8 = dequantize_rows


def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M, 1] float32): dynamic per-token scales."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_(min=MIN_ACT_SCALE)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    quantize_input: bool,
) -> torch.Tensor:
    """The FP8 layer's math in float32 (CPU or GPU): W8A8 when `quantize_input`, else W8A16."""
    w = dequantize_fp8(q, scale)
    if quantize_input:
        xq, xs = quantize_act_fp8(x)
        xf = xq.float() * xs
    else:
        xf = x.float()
    y = F.linear(xf, w, bias.float() if bias is not None else None)
    return y.to(x.dtype)


def scaled_mm_supported(k: int, n: int) -> bool:
    # cuBLASLt FP8 GEMMs need both matrix dims of the weight divisible by 16
    return k % 16 == 0 and n % 16 == 0


def fp8_scaled_mm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 through torch._scaled_mm with row-wise scales.

    Requirements (aten ScaledBlas.cpp): mat1 [M, K] row-major FP8, mat2 [K, N] column-major FP8 (the
    transpose of our row-major [N, K] weight, no copy), K and N multiples of 16, scale_a [M, 1] and
    scale_b [1, N] contiguous float32; a bias must be bf16 for bf16 output. Row-wise scaling always
    supports bf16 output, so fp16 models get a bf16 result cast back.
    """
    k = x.shape[1]
    n = q.shape[0]
    assert q.stride(1) == 1 and scaled_mm_supported(k, n)
    if x.is_cuda and kernels.AVAILABLE:
        from ..kernels.fp8 import quant_fp8_per_token

        xq, xs = quant_fp8_per_token(x, FP8_MAX, MIN_ACT_SCALE)
    else:
        xq, xs = quantize_act_fp8(x)
    fuse_bias = bias is not None and bias.dtype == torch.bfloat16
    y = torch._scaled_mm(
        xq,
        q.t(),
        scale_a=xs,
        scale_b=scale.view(1, n),
        bias=bias if fuse_bias else None,
        out_dtype=torch.bfloat16,
    )
    if bias is not None and not fuse_bias:
        y = y + bias
    return y.to(x.dtype)


class Fp8LinearMethod(RowScaledMethod):
    """Parameters: weight [N, K] float8_e4m3fn, weight_scale [N] float32 (compressed-tensors names)."""

    weight_dtype = FP8_DTYPE

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight_fp8(w)

    def gemv_max_m(self) -> int:
        return W8A16_MAX_M

    def widens_above(self, layer: Linear) -> int | None:
        return None if scaled_mm_supported(layer.in_features, layer.weight.shape[0]) else W8A16_MAX_M

    def fallback(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        w, s, b = layer.weight, layer.weight_scale, layer.bias
        if x.is_cuda and scaled_mm_supported(layer.in_features, w.shape[0]):
            return fp8_scaled_mm(x, w, s, b)
        return fp8_linear_reference(x, w, s, b, quantize_input=x.shape[0] > W8A16_MAX_M)
