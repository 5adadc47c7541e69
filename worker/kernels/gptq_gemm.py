"""GPTQ: fused dequantize + matmul for decode batches, and a dequantize kernel for large ones.

Weight layout (quant/gptq.py rewrites the checkpoint into it at load):

    qweight_t int32 [N, K / p]   p = 32 / bits codes per word, packed along K: the code of W[n, k]
                                 sits in bits [bits * (k % p), bits * (k % p + 1)) of qweight_t[n, k // p]
    scales_t  fp16  [N, G]       zeros_t uint8 [N, G]      g_idx int32 [K] (group of column k)
    W[n, k] = scales_t[n, g] * (q - zeros_t[n, g]),  g = g_idx[k]

`gptq_gemm` (decode batches, M <= kernels.MAX_M): each program streams BLOCK_N rows of packed codes along
K, like gemv.py's tensor-core path at 1/4 of the bytes (4-bit), against BLOCK_M rows of x; M blocks are the
grid's fastest axis, so programs sharing a weight tile run together and DRAM serves it once. A
[BLOCK_N, BLOCK_K / p] tile of words is loaded once and split in registers into [BLOCK_N, BLOCK_K]
codes (shift, mask, reshape). When groups are contiguous and a K block lies inside one group
(`group_k` a multiple of BLOCK_K: the usual group 128, act-order sorted away at load), the scale
and zero are one [BLOCK_N] row per block: the block's integer differences (q - z, exact in bf16) go
through the tensor cores and the scale multiplies the [M, BLOCK_N] partial sum. Otherwise scales
and zeros are gathered per element through g_idx. SPLIT_K > 1 cuts K into slices reduced with
float32 atomics, for layers with few output rows.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, num_sms, pdl, sm90
from .gemv import row_path, tc_block_m, tc_block_n

# gptq_gemm's launch (its tile sizes are arguments); gptq_dequant's tile
GEMM_NUM_STAGES = 4
GEMM_NUM_WARPS = 4
# above this many rows (W1's decode batches, short prefills) gptq_gemm takes [128, 64] tiles over 8
# warps, 4 stages, no K split: H100 sweep of bench/gptq_gemm_sweep.py (docs/bench/
# 2026-11-26-h100-s8-gptq-gemm-sweep.json), 8B shapes at 128 / 256 rows in us against the former
# [64, 64] tiles over 4 warps: qkv 71 / 134 against 138 / 278, o 71 / 71 against 88 / 150, gate_up
# 262 / 447 against 521 / 950, down 225 / 225 against 255 / 498. Up to 64 rows the former launches
# (smaller tiles, K split across programs) stay the faster ones for qkv, o and down; gate_up's best
# there, [64, 128] over 4 warps (137 against 151 / 188 at 16 / 64 rows), is not applied yet. Hopper
# only (kernels.sm90): measured there, and 4 stages of these tiles take ~144 KB of shared memory.
BIG_M = 64
DEQUANT_BLOCK_N = 64
DEQUANT_BLOCK_K = 128


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """Split int32 words [R, C] into their 32 / BITS codes: [R, C, 32 / BITS], code j of a word in
    bits [BITS * j, BITS * (j + 1))."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    return (words[:, :, None] >> (tl.arange(0, PACK) * BITS)[None, None, :]) & MASK


@triton.jit
def _gptq_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K, G, group_k,
    stride_xm, stride_ym,
    BITS: tl.constexpr, PER_BLOCK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    rows64 = offs_n.to(tl.int64)
    qw_rows = qw_ptr + rows64[:, None] * (K // PACK)
    sz_rows = rows64[:, None] * G
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(K, k_lo + k_chunk)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        k_ok = offs_k < k_hi
        nk_ok = n_ok[:, None] & k_ok[None, :]
        # each packed word is loaded once and split into its PACK codes: [BN, BK / PACK, PACK] -> [BN, BK]
        words = tl.load(
            qw_rows + offs_w[None, :], mask=n_ok[:, None] & (offs_w * PACK < k_hi)[None, :], other=0
        )
        q = tl.reshape(_unpack(words, BITS), (BLOCK_N, BLOCK_K))
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        if PER_BLOCK_SCALE:
            g = k0 // group_k
            s = tl.load(s_ptr + rows64 * G + g, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
            z = tl.load(z_ptr + rows64 * G + g, mask=n_ok, other=0).to(tl.int32)
            w = (q - z[:, None]).to(x.dtype)
            part = tl.dot(x, tl.trans(w))  # [BM, BN] float32
            acc += part * s[None, :]
        else:
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)  # [BK]
            s = tl.load(s_ptr + sz_rows + g[None, :], mask=nk_ok, other=0.0).to(tl.float32)  # [BN, BK]
            z = tl.load(z_ptr + sz_rows + g[None, :], mask=nk_ok, other=0).to(tl.int32)
            w = ((q - z).to(tl.float32) * s).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:  # noqa: SIM102 (a constexpr test, then a runtime one: Triton compiles them apart)
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(y, acc, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit
def _stream_tile(
    qw_rows, s_ptr, z_ptr, rows64, n_ok, k0, K, G,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Load and dequantize the [BLOCK_N, BLOCK_K] weight tile at column k0 (float32)."""
    PACK: tl.constexpr = 32 // BITS
    GPB: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # groups per K block
    GW: tl.constexpr = BLOCK_K // GPB  # columns per group inside the block
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    words = tl.load(qw_rows + offs_w[None, :], mask=n_ok[:, None] & (offs_w * PACK < K)[None, :], other=0)
    # codes as floats without an int->float conversion: the bits of 2^23 + q are 0x4B000000 | q
    qf = tl.reshape((_unpack(words, BITS) | 0x4B000000).to(tl.float32, bitcast=True), (BLOCK_N, GPB, GW))
    offs_g = k0 // GROUP + tl.arange(0, GPB)
    sz_ok = n_ok[:, None] & (offs_g < G)[None, :]
    s = tl.load(s_ptr + rows64[:, None] * G + offs_g[None, :], mask=sz_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows64[:, None] * G + offs_g[None, :], mask=sz_ok, other=0).to(tl.float32)
    return tl.reshape((qf - (z + 8388608.0)[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _gptq_stream_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G,
    stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, FMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Contiguous groups of GROUP columns (BLOCK_K a multiple of GROUP, or GROUP of BLOCK_K)."""
    PACK: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    rows64 = offs_n.to(tl.int64)
    qw_rows = qw_ptr + rows64[:, None] * (K // PACK)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # the first tile does not depend on the previous kernel: load it before waiting
    w = _stream_tile(qw_rows, s_ptr, z_ptr, rows64, n_ok, 0, K, G, BITS, GROUP, BLOCK_N, BLOCK_K)
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)  # after the wait: see kernels/gemv.py
    x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    if FMA:
        acc2 = w * x.to(tl.float32)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _stream_tile(qw_rows, s_ptr, z_ptr, rows64, n_ok, k0, K, G, BITS, GROUP, BLOCK_N, BLOCK_K)
            ks = k0 + offs_k
            x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc2 += w * x.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)))
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _stream_tile(qw_rows, s_ptr, z_ptr, rows64, n_ok, k0, K, G, BITS, GROUP, BLOCK_N, BLOCK_K)
            ks = k0 + offs_k
            x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def stream_block_k(m: int, k: int) -> int:
    return min(1024 if m == 1 else 256, triton.next_power_of_2(k))


def stream_ok(group_k: int, bits: int, k: int, m: int = 1) -> bool:
    """Whether gptq_stream takes this layer: contiguous groups that tile its K blocks evenly."""
    bk = stream_block_k(m, k)
    return group_k > 0 and bits in (2, 4, 8) and (bk % group_k == 0 or group_k % bk == 0)


def row4_ok(bits: int, group_k: int) -> bool:
    """Whether kernels/gptq_row4.py (Gluon, CUDA only: there is no interpreter) can take one row of
    this layout: 4-bit codes in groups of whole words, and a Triton that has Gluon."""
    return bits == 4 and group_k > 0 and group_k % 8 == 0 and _has_gluon()


@functools.cache
def _has_gluon() -> bool:
    return importlib.util.find_spec("triton.experimental.gluon") is not None


def gptq_stream(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    bits: int,
    group_k: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 8,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    fma: bool | None = None,
    use_pdl: bool | None = None,
) -> torch.Tensor:
    """Decode-batch path for contiguous groups (`group_k` > 0): x [M, K] -> y [M, N] in x's dtype."""
    m, k = x.shape
    n, g = scales_t.shape
    assert group_k > 0 and x.stride(1) == 1 and qweight_t.shape == (n, k * bits // 32)
    block_k = min(block_k, triton.next_power_of_2(k)) if block_k else stream_block_k(m, k)
    assert block_k % group_k == 0 or group_k % block_k == 0, (block_k, group_k)
    fma, use_pdl, block_m = row_path(m, fma, use_pdl)  # as kernels/gemv.py
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gptq_stream_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, qweight_t, scales_t, zeros_t, bias if bias is not None else scales_t, y,
        m, n, k, g,
        x.stride(0), y.stride(0),
        BITS=bits, GROUP=group_k, HAS_BIAS=bias is not None, FMA=fma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=use_pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=use_pdl,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y


@triton.jit
def _gptq_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr,
    N, K, G,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = tl.program_id(1) * (BLOCK_K // PACK) + tl.arange(0, BLOCK_K // PACK)
    rows64 = offs_n.to(tl.int64)[:, None]
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w_ok = (offs_n < N)[:, None] & (offs_w * PACK < K)[None, :]
    words = tl.load(qw_ptr + rows64 * (K // PACK) + offs_w[None, :], mask=w_ok, other=0)
    q = tl.reshape(_unpack(words, BITS), (BLOCK_N, BLOCK_K))
    g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
    s = tl.load(s_ptr + rows64 * G + g[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows64 * G + g[None, :], mask=ok, other=0).to(tl.int32)
    w = (q - z).to(tl.float32) * s
    tl.store(w_ptr + rows64 * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


def pick_split_k(m_blocks: int, n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Enough K slices that a layer with few output rows still puts ~2 programs on every SM."""
    if device.type != "cuda":
        return 1
    programs = m_blocks * triton.cdiv(n, block_n)
    want = max(1, (2 * num_sms(device)) // programs)
    return int(min(want, 8, max(1, k // (4 * block_k))))


def gptq_gemm(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_k: int,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x [M, K] (columns already in the layer's K order) -> y [M, N] in x's dtype.

    group_k > 0: groups are contiguous runs of group_k columns (g_idx[k] == k // group_k)."""
    m, k = x.shape
    n, g = scales_t.shape
    assert x.stride(1) == 1 and qweight_t.shape == (n, k * bits // 32)
    if m > BIG_M and sm90(x.device):  # [128, 64] tiles over 8 warps, no K split (BIG_M's comment)
        block_m, block_n = block_m or 128, block_n or 64
        num_warps, num_stages = num_warps or 8, num_stages or 4
        split_k = 1 if split_k is None else split_k
    block_m = block_m or tc_block_m(m)
    if block_n is None:
        block_n = tc_block_n(m)
    if block_k is None:
        block_k = 128 if group_k <= 0 or group_k % 128 == 0 or g == 1 else 32
    per_block = group_k > 0 and (g == 1 or group_k % block_k == 0)
    m_blocks = triton.cdiv(m, block_m)
    if split_k is None:
        split_k = pick_split_k(m_blocks, n, k, block_n, block_k, x.device)
    y = (
        torch.zeros((m, n), dtype=torch.float32, device=x.device)
        if split_k > 1
        else torch.empty((m, n), dtype=x.dtype, device=x.device)
    )
    _gptq_gemm_kernel[(m_blocks, triton.cdiv(n, block_n), split_k)](
        x, qweight_t, scales_t, zeros_t, g_idx, bias if bias is not None else scales_t, y,
        m, n, k, g, max(group_k, 1),
        x.stride(0), y.stride(0),
        BITS=bits, PER_BLOCK_SCALE=per_block, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps or GEMM_NUM_WARPS, num_stages=num_stages or GEMM_NUM_STAGES,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y.to(x.dtype) if split_k > 1 else y


def gptq_dequant(
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The layer's W [N, K] in `dtype` (for cuBLAS on batches above kernels.MAX_M rows)."""
    n, g = scales_t.shape
    k = g_idx.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=qweight_t.device)
    _gptq_dequant_kernel[(triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K))](
        qweight_t, scales_t, zeros_t, g_idx, w, n, k, g,
        BITS=bits, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return w
