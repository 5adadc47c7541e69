"""Dynamic per-token FP8 quantization of activations (the A8 of W8A8), one program per row.

    scale[m] = max(max_k |x[m, k]| / FP8_MAX, MIN_SCALE)
    xq[m, k] = clamp(x[m, k] / scale[m], -FP8_MAX, FP8_MAX)  as float8_e4m3fn (round to nearest even)

One launch instead of the five elementwise ones of the torch expression (abs, amax, div, clamp,
cast): inside a captured decode step every launch costs a couple of microseconds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS


@triton.jit
def _quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr,
    K, stride_xm, stride_qm,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # IEEE divisions (div_rn), not the approximate `/`: codes match the torch reference exactly
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


def quant_fp8_per_token(
    x: torch.Tensor, fp8_max: float, min_scale: float, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> (xq [M, K] float8_e4m3fn, scale [M, 1] float32)."""
    m, k = x.shape
    assert x.stride(1) == 1
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quant_fp8_kernel[(m,)](
            x, q, s, k, x.stride(0), q.stride(0),
            FP8_MAX=fp8_max, MIN_SCALE=min_scale, BLOCK=min(block, triton.next_power_of_2(k)),
            **LAUNCH_OPTIONS,
        )  # fmt: skip
    return q, s
