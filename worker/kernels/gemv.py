"""y = (x W^T) * s + b for few rows (decode batches): one weight-streaming kernel for 16-bit and
8-bit (int8, float8_e4m3fn, per-row scale) weights.

With a handful of rows a projection is one pass over the weight matrix, so its speed is the rate
at which the weights stream. Each program owns BLOCK_N full rows of W (K contiguous, 16-byte
loads) and walks K in BLOCK_K steps through a software pipeline:
- one row (W3's batch 1, `fma=True`): the tile is widened to float32 and multiplied into a
  [BLOCK_N, BLOCK_K] float32 accumulator on the CUDA cores; one reduction over K at the end. No
  tensor cores, and where K is whole tiles x is read as a broadcast tile in the weights' register
  layout, so no tile passes through shared memory.
- more rows: the tile (widened to x's dtype in registers when 8-bit, exact for int8 and e4m3)
  goes through the tensor cores against BLOCK_M rows of x (M padded to 16). Batches above 64 rows
  (above BLOCK_M's 64 or 128: tc_launch) tile M on the grid's fastest axis, so the programs that
  share a weight tile run together and DRAM serves it once.
The row scale factors out of the dot product and is applied once at the end.

Under programmatic dependent launch (pdl.py) the first weight tiles (two for one row) are loaded
before the program waits for the kernel that produced x: a kernel's ramp overlaps its predecessor's
tail.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, MAX_M, pdl, sm90
from .rms import rms_rstd, rms_scale, rstd_of_squares


class AddNorm(NamedTuple):
    """A one-row projection's output added into the residual stream and RMS-normalized in the same
    launch (`gemv(..., add_norm=)`, gptq_row4's likewise): residual += y in place, and the launch
    returns rmsnorm(residual) * weight, as layers/norm.RMSNorm(y, residual) would.

    The norm needs the whole new residual row, which the launch's programs write in pieces, so the
    last program to finish does it: every program adds its rows into the residual, then takes a
    ticket from `counter` (one int32, zero between launches: the last program resets it); the
    program that draws the last ticket reads the row back and normalizes it. In a batch-1 decode
    step this replaces a norm kernel, a dependent launch on the step's critical path (H100 W3 with
    and without it: docs/benchmarks.md, seventh session)."""

    residual: torch.Tensor  # [1, N] contiguous, x's dtype; updated in place
    weight: torch.Tensor  # [N] the norm's weight
    eps: float
    # int32 [1], zero; owned by the norm (one per norm, never shared by launches in flight)
    counter: torch.Tensor


class NormIn(NamedTuple):
    """A one-row launch whose input is the raw residual stream, RMS-normalized inside the launch
    (`gemv(..., norm_in=)`): every program reads the row once for its 1 / rms, then normalizes each x
    tile as it reads it, rounding as layers/norm.RMSNorm does. The projection before it then only adds
    into the stream (`gemv(..., add_into=)`): no ticket, no last program normalizing the row while
    every other SM waits, and the next launch's programs all compute the norm side by side."""

    weight: torch.Tensor  # [K] the norm's weight, contiguous
    eps: float


class AddSquares(NamedTuple):
    """A one-row projection's output added into the residual stream, with the next RMSNorm split
    between this launch and its consumer's (`gemv(..., add_squares=)`, then `rms_in=`): every
    program adds its rows into the residual, writes them times the norm's weight as the launch's
    output, and writes the sum of their squares into `squares[program]`. The consumer multiplies
    that output by its weights and scales its results by 1 / rms from the partial sums (RmsIn):
    rmsnorm(r) * w @ W^T = (r * w) @ W^T / rms(r), so no program waits for the whole row, nothing
    normalizes the row twice, and no per-element norm sits in the consumer's weight loop.

    Rounding differs from RMSNorm's (r * w rounded once, the 1 / rms applied in float32 to the
    products, against r / rms rounded and then times w rounded): for the 8-bit layers that take it
    (Linear.takes_rms_in) it is far below the weights' own rounding."""

    residual: torch.Tensor  # [1, N] contiguous, x's dtype; updated in place
    weight: torch.Tensor  # [N] the norm's weight
    # float32 [cdiv(N, block_n)]: one partial sum per program (RMSNorm.partial_squares)
    squares: torch.Tensor


class RmsIn(NamedTuple):
    """The consumer's half of AddSquares (`gemv(..., rms_in=)`): x is AddSquares' output r * w,
    and the launch multiplies its results by rsqrt(sum(squares) / K + eps) (float32, as RMSNorm)."""

    squares: torch.Tensor  # float32, AddSquares' partial sums
    eps: float


@triton.jit
def residual_add(y, offs_n, n_ok, res_ptr):
    """residual[offs_n] += y (y [BLOCK_N] float32, rounded to the activations' dtype first, the sum
    rounded again: as the unfused projection and add round). Returns the new rows in float32."""
    dtype = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + offs_n, mask=n_ok, other=0.0)
    new = (y.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(res_ptr + offs_n, new, mask=n_ok)
    return new.to(tl.float32)


@triton.jit
def add_squares_epilogue(y, pid, offs_n, n_ok, res_ptr, nw_ptr, out_ptr, sq_ptr):
    """y [BLOCK_N] float32 (rows offs_n) -> residual[offs_n] += y; out[offs_n] = new rows times the
    norm's weight, rounded to the activations' dtype; squares[pid] = the sum of the new rows'
    squares (AddSquares)."""
    r = tl.where(n_ok, residual_add(y, offs_n, n_ok, res_ptr), 0.0)  # rows past N add nothing
    w = tl.load(nw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, (r * w).to(out_ptr.dtype.element_ty), mask=n_ok)
    tl.store(sq_ptr + pid, tl.sum(r * r, axis=0))


@triton.jit
def add_norm_epilogue(y, offs_n, n_ok, res_ptr, nw_ptr, out_ptr, cnt_ptr, N, eps, NORM_BLOCK: tl.constexpr):
    """y [BLOCK_N] float32 (rows offs_n of the projection) -> residual[offs_n] += y; the launch's last
    program then writes rmsnorm(residual) * w into out (AddNorm). Rounding as the unfused pair:
    y rounded to the activations' dtype, the sum rounded, the norm in float32 as _rmsnorm_kernel."""
    residual_add(y, offs_n, n_ok, res_ptr)
    # every thread's stores come before the ticket (one thread takes it, with release semantics)
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        cols = tl.arange(0, NORM_BLOCK)
        ok = cols < N
        # the other programs' rows: read at L2 (.cg), where their stores are visible after the ticket
        x = tl.load(res_ptr + cols, mask=ok, other=0.0, cache_modifier=".cg")
        w = tl.load(nw_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + cols, rms_scale(x, w, rms_rstd(x.to(tl.float32), N, eps)), mask=ok)
        tl.store(cnt_ptr, 0)  # ready for the next launch (which starts after this one has finished)


@triton.jit
def norm_in_rstd(x_ptr, K, eps, NORM_BLOCK: tl.constexpr):
    """1 / rms of the input row x [K] (float32, as _rmsnorm_kernel computes it): a norm_in launch's
    every program reads the whole row once (8 KB at Llama-8B's width, from L2) before its K loop."""
    cols = tl.arange(0, NORM_BLOCK)
    return rms_rstd(tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32), K, eps)


@triton.jit
def argmax_key_min():
    """Below every key argmax_key makes (ARGMAX_KEY_MIN): a best key's value between launches."""
    return tl.full((), -2147483648, tl.int64) << 32


@triton.jit
def argmax_key_index(key):
    """The index a key of argmax_key holds."""
    low = (tl.full((), 1, tl.int64) << 32) - 1
    return low - (key & low)


@triton.jit
def argmax_key(v, idx):
    """int64 keys that order (value, index) pairs as torch.argmax picks: by value, NaN above every
    number (the first NaN wins), -0.0 equal to 0.0, then the smaller index. The value's float32
    bits, made to order as signed integers, in the high half; 2^32 - 1 - index in the low half."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(v != v, 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))
    low = (tl.full((), 1, tl.int64) << 32) - 1
    return (ordered.to(tl.int64) << 32) | (low - idx.to(tl.int64))


@triton.jit
def argmax_epilogue(v, offs_n, n_ok, best_ptr):
    """v [BLOCK_N] float32 (this program's logits, columns offs_n) -> best = max(best, the key of
    its first maximum) (argmax_key), one atomic per program; kernels/elementwise.argmax_finish turns
    the launch's best key into the token id and resets it."""
    key = tl.where(n_ok, argmax_key(v, offs_n), argmax_key_min())
    tl.atomic_max(best_ptr, tl.max(key, axis=0), sem="relaxed", scope="gpu")


NUM_WARPS = 4  # the default configurations' warps (tc_launch's and callers' launches aside)


@triton.jit
def merged_rows(pid, n_inter, BLOCK_N: tl.constexpr, j):
    """Weight rows of program `pid` over a merged [gate; up] matrix of 2 n_inter rows, for local rows j:
    even j the gate row, odd j the up row of channel pid * BLOCK_N / 2 + j // 2, so that a program
    holds both halves of its channels (silu_mul_epilogue); and which of them exist."""
    ch = pid * (BLOCK_N // 2) + j // 2
    return (j % 2) * n_inter + ch, ch < n_inter


@triton.jit
def silu_mul_epilogue(y, pid, out_ptr, n_inter, BLOCK_N: tl.constexpr):
    """y [BLOCK_N] float32: the program's rows of a merged [gate; up] projection, gate and up of one
    channel side by side (merged_rows) -> silu(gate) * up for its BLOCK_N / 2 channels, rounded as
    the unfused pair rounds (projection output, then silu, then the product: _silu_mul_kernel)."""
    dtype = out_ptr.dtype.element_ty
    g, u = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
    g = g.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    offs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + offs, (act * u.to(dtype).to(tl.float32)).to(dtype), mask=offs < n_inter)


@triton.jit
def _w_tile(w_rows, ks, n_ok, K, EVEN_K: tl.constexpr):
    if EVEN_K:  # K a multiple of BLOCK_K: no column mask
        return tl.load(w_rows + ks[None, :], mask=n_ok[:, None], other=0.0)
    return tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _tile(acc, w, x_rows, nw_rows, rstd, ks, m_ok, K, FMA: tl.constexpr, EVEN_K: tl.constexpr,
          NORM_IN: tl.constexpr):  # fmt: skip
    """One weight tile into the accumulator: one row (FMA) widens it to float32 into a
    [BLOCK_N, BLOCK_K] accumulator (x broadcasts); more rows widen it to x's dtype in registers
    and go through the tensor cores into [BLOCK_M, BLOCK_N]. NORM_IN (one row): x is the raw
    residual row, normalized here (rms_scale) with its weights at nw_rows and 1 / rms `rstd`."""
    if FMA and EVEN_K:
        # unmasked, so that the compiler sees x constant down the tile's rows and each thread loads
        # and widens its columns of x once (a masked load is issued per element)
        x = tl.load(x_rows + ks[None, :])
        if NORM_IN:
            x = rms_scale(x, tl.load(nw_rows + ks[None, :]), rstd)
    else:
        ok = m_ok[:, None] & (ks < K)[None, :]
        x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0)
        if NORM_IN:
            x = rms_scale(x, tl.load(nw_rows + ks[None, :], mask=ok, other=0.0), rstd)
    if FMA:
        return acc + w.to(tl.float32) * x.to(tl.float32)
    else:
        return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, cnt_ptr, best_ptr, xnw_ptr, sq_ptr,
    M, N, K, n_sq,
    stride_xm, stride_wn, stride_ym, eps,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, FMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, ADD_NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
    SILU_MUL: tl.constexpr, EVEN_K: tl.constexpr, ARGMAX: tl.constexpr,
    ADD_INTO: tl.constexpr, NORM_IN: tl.constexpr, ADD_SQ: tl.constexpr, RMS_IN: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SILU_MUL:  # [gate; up] rows, a program's gate and up rows of the same channels side by side
        offs_n, n_ok = merged_rows(pid_n, N // 2, BLOCK_N, tl.arange(0, BLOCK_N))
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if FMA and EVEN_K:
        # one row, x read as a [BLOCK_N, BLOCK_K] broadcast of itself: then its tile takes the
        # weight tile's register layout and neither goes through shared memory (loaded as [1,
        # BLOCK_K], x got a layout of its own and every weight tile was converted to it through
        # shared memory, with barriers, in every K step); each thread loads x once per column
        x_rows = x_ptr + (offs_n * 0)[:, None]
        nw_rows = xnw_ptr + (offs_n * 0)[:, None]
    else:
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        nw_rows = xnw_ptr + (offs_m * 0)[:, None]
    # the first PREFETCH weight tiles do not depend on the previous kernel: load them before waiting
    # (under PDL the previous kernel's tail then overlaps this one's first DRAM round trips)
    if PREFETCH >= 1:
        w0 = _w_tile(w_rows, offs_k, n_ok, K, EVEN_K)
    if PREFETCH >= 2:
        w1 = _w_tile(w_rows, BLOCK_K + offs_k, n_ok, K, EVEN_K)
    if PREFETCH >= 3:
        w2 = _w_tile(w_rows, 2 * BLOCK_K + offs_k, n_ok, K, EVEN_K)
    if PREFETCH >= 4:
        w3 = _w_tile(w_rows, 3 * BLOCK_K + offs_k, n_ok, K, EVEN_K)
    pdl.wait(USE_PDL)
    # only now may the next kernel's programs take free SM slots (earlier, kernels further down
    # the chain would pile up on the SMs waiting, taking slots this one still needs)
    pdl.launch_dependents(USE_PDL)
    if NORM_IN:  # one row (the wrapper checks): x is the residual row, normalized as it is read
        rstd = norm_in_rstd(x_ptr, K, eps, NORM_BLOCK)
    elif RMS_IN:  # x is r * w (AddSquares): 1 / rms(r) from the producer's partial sums, used last
        sq = tl.arange(0, NORM_BLOCK)
        rstd = rstd_of_squares(tl.sum(tl.load(sq_ptr + sq, mask=sq < n_sq, other=0.0), axis=0), K, eps)
    else:
        rstd = 1.0
    if FMA:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced over K once, at the end
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH >= 1:
        acc = _tile(acc, w0, x_rows, nw_rows, rstd, offs_k, m_ok, K, FMA, EVEN_K, NORM_IN)
    if PREFETCH >= 2:
        acc = _tile(acc, w1, x_rows, nw_rows, rstd, BLOCK_K + offs_k, m_ok, K, FMA, EVEN_K, NORM_IN)
    if PREFETCH >= 3:
        acc = _tile(acc, w2, x_rows, nw_rows, rstd, 2 * BLOCK_K + offs_k, m_ok, K, FMA, EVEN_K, NORM_IN)
    if PREFETCH >= 4:
        acc = _tile(acc, w3, x_rows, nw_rows, rstd, 3 * BLOCK_K + offs_k, m_ok, K, FMA, EVEN_K, NORM_IN)
    for k0 in range(PREFETCH * BLOCK_K, K, BLOCK_K):
        w = _w_tile(w_rows, k0 + offs_k, n_ok, K, EVEN_K)
        acc = _tile(acc, w, x_rows, nw_rows, rstd, k0 + offs_k, m_ok, K, FMA, EVEN_K, NORM_IN)
    if FMA:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    if RMS_IN:
        acc *= rstd
    if HAS_SCALE:
        acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:  # one row (the wrapper checks)
        silu_mul_epilogue(tl.sum(acc, axis=0), pid_n, y_ptr, N // 2, BLOCK_N)
    elif ADD_NORM:  # one row (the wrapper checks)
        add_norm_epilogue(
            tl.sum(acc, axis=0), offs_n, n_ok, res_ptr, nw_ptr, y_ptr, cnt_ptr, N, eps, NORM_BLOCK
        )
    elif ADD_INTO:  # one row (the wrapper checks)
        residual_add(tl.sum(acc, axis=0), offs_n, n_ok, res_ptr)
    elif ADD_SQ:  # one row (the wrapper checks)
        add_squares_epilogue(tl.sum(acc, axis=0), pid_n, offs_n, n_ok, res_ptr, nw_ptr, y_ptr, sq_ptr)
    else:
        y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        # rounded to x's dtype first: a float32 output (logits) holds what the 16-bit one would
        y_val = acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
        tl.store(y, y_val, mask=m_ok[:, None] & n_ok[None, :])
        if ARGMAX:  # one row (the wrapper checks)
            argmax_epilogue(tl.sum(y_val.to(tl.float32), axis=0), offs_n, n_ok, best_ptr)


def epilogue_args(add_norm: AddNorm | None, y: torch.Tensor) -> tuple[AddNorm, int]:
    """The AddNorm tensors a one-row launch writing y [1, N] passes (checked; y itself as unused
    stand-ins without one) and its NORM_BLOCK (1 without: no extra specialization)."""
    if add_norm is None:
        return AddNorm(y, y, 0.0, y), 1
    assert y.shape[0] == 1, "add_norm takes one row"
    r = add_norm.residual
    assert r.shape == y.shape and r.dtype == y.dtype and r.is_contiguous(), "residual: [1, N] like the output"
    assert add_norm.weight.shape == (y.shape[1],) and add_norm.weight.is_contiguous()
    assert add_norm.counter.dtype == torch.int32 and add_norm.counter.numel() == 1
    return add_norm, triton.next_power_of_2(y.shape[1])


def prefetch_tiles(prefetch: int, k: int, block_k: int) -> int:
    """Weight tiles a launch loads before its PDL wait: `prefetch`, but none past K where K is whole
    tiles, so that its loads stay unmasked (EVEN_K; e.g. the 16-bit o_proj's 4 of a 1,024-wide K
    in 512-wide tiles). Where K is not whole tiles the loads are masked anyway."""
    if k % block_k == 0 and k >= block_k:
        return min(prefetch, k // block_k)
    return prefetch


def tc_block_m(m: int) -> int:
    """Rows of x per program on the tensor-core path (tl.dot needs M >= 16; batches above 64 rows
    tile M on the grid)."""
    return min(64, max(16, triton.next_power_of_2(m)))


def tc_block_n(m: int) -> int:
    """Weight rows per program on the tensor-core path: wider tiles as the batch grows."""
    return 16 if m <= 16 else (32 if m <= 64 else 64)


def row_path(m: int, fma: bool | None, use_pdl: bool | None) -> tuple[bool, bool, int]:
    """(fma, use_pdl, block_m) of a launch: the one-row CUDA-core path for m == 1 (unless the caller
    passes fma=False), else the tensor-core path over tc_block_m(m) rows. PDL pays on the one-row
    path only: chains of the tensor-core path ran slower with it (8 rows: 6.0 vs 5.3 ms for 32
    layers, docs/bench/2026-11-25-h100-gemv-sweep2-m8.json)."""
    fma = (m == 1) if fma is None else (fma and m == 1)
    use_pdl = (pdl.enabled() and fma) if use_pdl is None else use_pdl
    return fma, use_pdl, 1 if fma else tc_block_m(m)


# weight rows per program of every one-row launch's default tiles (default_config, one_row_programs)
ONE_ROW_BLOCK_N = 8


def default_config(m: int, n: int, k: int, weight_bytes: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_stages, prefetch) by batch rows and weight width, from the H100 sweeps
    of bench/gemv_bench.py (docs/bench/2026-11-25-h100-gemv-sweep*.json, ...-s5-gemv-prefetch.json);
    NUM_WARPS warps, and one row takes the CUDA-core path (see `row_path`); 8-bit weights at 16+ rows
    on Hopper take tc_launch's launches where it has one.

    One row: 8 weight rows of 1 KB per stage, 4 stages (bf16 [8, 512], 8-bit [8, 1024]); 8-bit
    layers of 6-16K short rows (qkv) do better with [8, 512] tiles 6 deep. Two weight tiles are
    loaded before the PDL wait (fifth session: the 32-layer chain 2.655 -> 2.614 ms in fp8, 4.864 ->
    4.836 in bf16; three tiles were slower in the chain). More rows: the former tensor-core
    kernels' tiles, about 8 KB of weights per stage, nothing loaded before the wait."""
    if m == 1:
        if weight_bytes == 1 and k <= 4096 and 6144 <= n <= 16384:
            return ONE_ROW_BLOCK_N, 512, 6, 2
        return ONE_ROW_BLOCK_N, 1024 // weight_bytes, 4, 2
    return tc_block_n(m), (512 // weight_bytes if m <= 16 else 256), 4, 0


def one_row_programs(n: int) -> int:
    """Programs of a one-row launch with n output rows and the default tiles (AddSquares writes
    one partial sum per program; gemv checks the count against its grid)."""
    return triton.cdiv(n, ONE_ROW_BLOCK_N)


def tc_launch(m: int, n: int, weight_bytes: int) -> tuple[int, int, int, int, int] | None:
    """(block_m, block_n, block_k, num_warps, num_stages) of 8-bit weights on the tensor-core path of
    a Hopper GPU (kernels.sm90) where the eighth session's sweep (bench/gemv_tc_sweep.py, docs/bench/2026-11-26-h100-s8-gemv-tc-
    sweep-{int8,fp8}.json, H100, us against the launches above) found better ones, else None:
    layers of 16K+ rows (gate_up) at 16+ rows take [64, 128] tiles, 128 columns deep, 3 stages (fp8
    16 / 64 rows 72 / 71 against 101 / 128; int8 64 / 128 / 256 rows 63 / 104 / 194 against 109 /
    159 / 308); other layers above 128 rows [128, 64] tiles over 8 warps, 4 stages (int8 256 rows:
    qkv 61 against 70, o 33 against 48, down 102 against 142). Not applied though the sweep found
    them: qkv at 64-128 rows (int8 28 / 34 against 35 / 49, fp8 34 against 43 at 64 rows), each with
    a launch of its own; the lm_head (vocabulary-sized N) and int8 at 16 rows were not swept."""
    if weight_bytes != 1 or m < 16:
        return None
    if n >= 16384:
        return 64, 128, 128, 4, 3
    if m > 128:
        return 128, 64, 128, 8, 4
    return None


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fma: bool | None = None,
    prefetch: int | None = None,
    use_pdl: bool | None = None,
    add_norm: AddNorm | None = None,
    silu_mul: bool = False,
    out_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    argmax_best: torch.Tensor | None = None,
    add_into: torch.Tensor | None = None,
    norm_in: NormIn | None = None,
    add_squares: AddSquares | None = None,
    rms_in: RmsIn | None = None,
) -> torch.Tensor:
    """x: [M, K] 16-bit, M <= MAX_M; weight: [N, K] row-major, 16-bit or 8-bit with `scale` [N]
    float32; returns [M, N] in x's dtype. With `add_norm` (one row only) the result is added into
    add_norm.residual and the launch returns the normalized residual instead (AddNorm). With
    `silu_mul` (one row) weight is a merged [gate; up] matrix of 2 I rows and the launch returns
    silu(gate) * up [1, I] (elementwise.silu_and_mul of the projection, in one launch).
    `out_dtype` float32 returns the result rounded to x's dtype and widened (logits for sampling,
    without a widening pass of their own). `argmax_best` (int64 [1], one row): the launch also
    folds its outputs' first maximum into it (argmax_epilogue; elementwise.argmax_finish reads it).
    `add_into` ([1, N], x's dtype, one row): the result is added into it in place and it is returned
    (residual_add). `norm_in` (one row): x is a residual row, and the launch multiplies
    rmsnorm(x) * norm_in.weight by the weights instead of x (NormIn). `add_squares` (one row): the
    result goes into the residual, and the launch returns the new residual times the norm's weight
    and writes its rows' partial sums of squares; `rms_in` (one row) scales the results by 1 / rms
    from such sums (AddSquares, RmsIn)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_M and weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    assert (scale is None) == (weight.element_size() > 1), "8-bit weights need a row scale"
    cfg_n, cfg_k, cfg_stages, cfg_prefetch = default_config(m, n, k, weight.element_size())
    fma, use_pdl, path_block_m = row_path(m, fma, use_pdl)
    # the sweep's launches replace the defaults as a whole, only where the caller chose none
    chosen = (block_m, block_n, block_k, num_warps, num_stages)
    if not fma and all(v is None for v in chosen) and sm90(x.device):
        block_m, block_n, block_k, num_warps, num_stages = tc_launch(m, n, weight.element_size()) or chosen
    block_m = path_block_m if fma or block_m is None else block_m
    block_n = block_n or (cfg_n if fma else max(16, cfg_n))  # tl.dot: N >= 16
    block_k = block_k or cfg_k
    prefetch = cfg_prefetch if prefetch is None else int(prefetch)
    assert 0 <= prefetch <= 4, "prefetch: 0-4 weight tiles loaded before the PDL wait"
    prefetch = prefetch_tiles(prefetch, k, block_k)
    if silu_mul:
        assert fma and n % 2 == 0 and add_norm is None, "silu_mul: one row, [gate; up] rows"
        assert block_n % 2 == 0
    if add_into is not None:  # written in place, no output of its own
        assert fma and add_norm is None and not silu_mul and argmax_best is None and out_dtype is None
        assert add_into.shape == (m, n) and add_into.dtype == x.dtype and add_into.is_contiguous()
        y = add_into
    else:
        y = torch.empty((m, n // 2 if silu_mul else n), dtype=out_dtype or x.dtype, device=x.device)
    assert add_norm is None or fma, "add_norm: one row on the CUDA-core path"
    an, norm_block = epilogue_args(add_norm, y)
    eps = an.eps  # the kernel's one eps: add_norm's, norm_in's or rms_in's (never two)
    squares, n_sq = y, 0
    if add_squares is not None:
        assert fma and add_norm is None and add_into is None and not silu_mul, (
            "add_squares: one row, plain output"
        )
        assert argmax_best is None and out_dtype is None
        r, squares, n_sq = add_squares.residual, add_squares.squares, add_squares.squares.numel()
        assert r.shape == y.shape and r.dtype == y.dtype and r.is_contiguous(), (
            "residual: [1, N] like the output"
        )
        assert add_squares.weight.shape == (n,) and add_squares.weight.is_contiguous()
        assert squares.dtype == torch.float32 and n_sq == triton.cdiv(n, block_n), (
            "one partial sum per program"
        )
        an = AddNorm(r, add_squares.weight, eps, y)
    if norm_in is not None:
        assert fma and add_norm is None, "norm_in: one row on the CUDA-core path, no add_norm"
        assert norm_in.weight.shape == (k,) and norm_in.weight.is_contiguous()
        eps, norm_block = norm_in.eps, triton.next_power_of_2(k)
    if rms_in is not None:
        assert fma and norm_in is None and add_norm is None and add_squares is None, "rms_in: one row"
        squares, n_sq = rms_in.squares, rms_in.squares.numel()
        assert squares.dtype == torch.float32 and squares.is_contiguous()
        eps, norm_block = rms_in.eps, triton.next_power_of_2(n_sq)
    if argmax_best is not None:
        assert fma and add_norm is None and not silu_mul, "argmax_best: one row, plain output"
        assert argmax_best.dtype == torch.int64 and argmax_best.numel() == 1
    _gemv_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight, y,
        an.residual, an.weight, an.counter, argmax_best if argmax_best is not None else y,
        norm_in.weight if norm_in is not None else x, squares,
        m, n, k, n_sq,
        x.stride(0), weight.stride(0), y.stride(0), eps,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, FMA=fma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_PDL=use_pdl, PREFETCH=prefetch, ADD_NORM=add_norm is not None,
        NORM_BLOCK=norm_block, SILU_MUL=silu_mul, ARGMAX=argmax_best is not None,
        ADD_INTO=add_into is not None, NORM_IN=norm_in is not None,
        ADD_SQ=add_squares is not None, RMS_IN=rms_in is not None,
        # whole tiles only, the prefetched ones included: then no load needs a column mask
        EVEN_K=k % block_k == 0 and k >= prefetch * block_k,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or cfg_stages,
        launch_pdl=use_pdl,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y
