"""y = (x Wq^T) * s (+ b) for decode batches: 8-bit weights (int8 or float8_e4m3fn), per-row scales.

The weight-streaming shape of skinny_gemm.py with half the bytes: each program streams BLOCK_N rows of
Wq (K contiguous), widens them to the activation dtype in registers (exact for both int8 and e4m3),
multiplies them on the tensor cores against BLOCK_M rows of x (M padded to 16) and applies the row
scale once at the end, where it factors out of the dot product. Batches above 64 rows tile M on
the grid's fastest axis, so the programs sharing a weight tile run together and read it from DRAM
once (L2 serves the others): cheaper than widening the whole matrix for cuBLAS up to a few hundred
rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 256  # the layers switch to widen + cuBLAS above this (quant/methods.FUSED_MAX_M)


@triton.jit
def _w8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK] 8-bit
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_stages: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """x: [M, K]; weight: [N, K] int8 or float8_e4m3fn, row-major; scale: [N] float32."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    assert weight.element_size() == 1 and scale.shape == (n,)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if block_n is None:
        block_n = 16 if m <= 16 else (32 if m <= 64 else 64)
    if block_k is None:  # the bytes per iteration of skinny_gemm's bf16 [16, 256] tile
        block_k = 512 if m <= 16 else 256
    _w8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, weight, scale, bias if bias is not None else scale, y,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y
