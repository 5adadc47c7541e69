"""RMSNorm's arithmetic for the kernels that normalize a row inside another launch (elementwise's
norm and embedding kernels, gemv's AddNorm epilogue and NormIn prologue): one definition, so that
every one of them rounds as layers/norm.RMSNorm does."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_rstd(xf, n, eps):
    """1 / rms of a row: xf [BLOCK] float32 (zeros past its n columns) -> rsqrt(mean(xf^2) + eps)."""
    return rstd_of_squares(tl.sum(xf * xf, axis=0), n, eps)


@triton.jit
def rstd_of_squares(sum_sq, n, eps):
    """1 / rms of a row of n elements from the float32 sum of their squares (gemv's RmsIn sums
    partial sums): rsqrt(sum_sq / n + eps)."""
    return tl.rsqrt(sum_sq / n + eps)


@triton.jit
def rms_scale(x, w, rstd):
    """Elements x (the activations' dtype) and their norm weights w -> rmsnorm(x) * w in x's dtype:
    normalized in float32 and rounded to x's dtype, times the weight, rounded again."""
    dtype = x.dtype
    normed = (x.to(tl.float32) * rstd).to(dtype).to(tl.float32)
    return (normed * w.to(tl.float32)).to(dtype)
