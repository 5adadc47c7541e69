"""Paged attention over a varlen batch, reading K/V straight from the block tables.

One kernel serves prefill chunks and decodes alike (no gather into contiguous copies). A program
owns one sequence, one tile of BLOCK_Q of its new query tokens, and one KV head; its rows are the
(token, query head) pairs of that tile that share the KV head (GQA packing), so a decode step still
feeds the tensor cores 16+ rows:

    row m  ->  token  = q_tile * BLOCK_Q + m // G      head = kv_head * G + m % G

Keys are visited in tiles of BLOCK_N positions; position n lives in page block_table[n // PAGE] at
offset n % PAGE. Query token j of a sequence with qlen new tokens and ctx total sits at absolute
position ctx - qlen + j and sees keys 0..that position (causal, including the cached prefix).
Online softmax in float32 with exp2.

For long contexts with few sequences (batch-1 decode of a long prompt) the context is split over
NUM_SPLITS programs whose partial results are merged by a second kernel (flash-decoding).

Decode steps (one new token per sequence) can also take the new token's rotary embedding and cache
write (`new_kv`, FUSE_NEW): every program rotates its query rows and its KV head's new key in
registers from the projection's output; the program whose key range holds the new position writes
K and V into their cache slot for later steps, and folds that key into its online softmax from
registers (the other programs compute the same fold masked off, which costs less than a branch).
No program of the launch reads the new slot (key loops stop one short of the context), so the write
needs no ordering against the reads. This replaces elementwise.rope_and_cache's launch per layer
(a couple of microseconds in a batch-1 decode step's chain of dependent kernels). The backend uses
it for decode batches of up to layers/attention.FUSED_DECODE_MAX_ROWS rows only: at W2's 250 rows
with an FP8 cache the fused kernel cost 6% of the throughput (docs/benchmarks.md, eighth session;
the cause was not measured: a likely one is the cached tile loaded before the wait, held in
registers through it).

An fp8 (e4m3) cache is widened to fp16 for the dots (Q_F16). K's layout suits its dot operand; V's
does not (the dot reduces over keys, V is stored key-major), and Triton converted V in the dot's
operand layout, reading it from shared memory one byte per instruction. On sm_89+ V is loaded as
int32 words of four codes instead and widened in that layout (_widen_e4m3_words, PTX
cvt.rn.f16x2.e4m3x2); fp16 then reaches the operand through shared memory like a bf16 cache's V.
Same values, ~9% fewer instructions per KV byte (bench/attention_sass.py) and 0.7-1.8% faster in
bench/attention_bench.py (docs/benchmarks.md, sixteenth session).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ..quant.fp8 import FP8_DTYPE, FP8_MAX
from . import LAUNCH_OPTIONS, pdl, sm89
from .elementwise import fp8_range


@triton.jit
def _widen_e4m3_words(w):
    """int32 words [N, D / 4] of packed e4m3 (little-endian) -> fp16 [N, D], converted in w's own
    register layout (the dot's operand layout cannot reach back through the join and reshape)."""
    b0, b1, b2, b3 = tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .b32 p, q; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 p, lo; "
        "cvt.rn.f16x2.e4m3x2 q, hi; mov.b32 {$0, $1}, p; mov.b32 {$2, $3}, q; }",
        "=h,=h,=h,=h,r",
        [w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [w.shape[0], 4 * w.shape[1]])


@triton.jit
def _kv_tile(kc_ptr, vc_ptr, bt_row, start, kv_hi, kvh, d, kc_stride_blk, kc_stride_slot, kc_stride_head,
             PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN_V: tl.constexpr):  # fmt: skip
    """Keys [D, N] and values [N, D] of positions start .. start + BLOCK_N (masked at kv_hi), as stored."""
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < kv_hi
    page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    kv_off = page * kc_stride_blk + (n % PAGE) * kc_stride_slot + kvh * kc_stride_head
    k = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=n_ok[None, :], other=0.0)
    if WIDEN_V:  # an e4m3 cache's V as int32 words of four, widened to fp16 in their load layout
        HEAD_DIM: tl.constexpr = d.shape[0]
        words = tl.load(vc_ptr.to(tl.pointer_type(tl.int32)) + (kv_off // 4)[:, None] + tl.arange(0, HEAD_DIM // 4)[None, :],
                        mask=n_ok[:, None], other=0)  # fmt: skip
        v = _widen_e4m3_words(words)
    else:
        v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    return k, v, n, n_ok


@triton.jit
def _dot_dtype(q, Q_F16: tl.constexpr):
    if Q_F16:
        # an fp8 cache under a bf16 model: dots in fp16, where e4m3 -> f16 is one conversion per two
        # elements (K and V are exact in fp16; q and p keep more mantissa than in bf16)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


@triton.jit
def _running_max(m_i, top):
    """Online softmax (log2 domain) meeting keys whose largest score per row is `top`: the new
    running max, and the max to subtract (0 while a row has seen only -inf: no -inf - -inf)."""
    m_new = tl.maximum(m_i, top)
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _attend_tile(q, k, v, n, n_ok, qpos, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr):
    """One key tile into the online softmax (log2 domain, float32): returns the new (m_i, l_i, acc)."""
    k = k.to(q.dtype)  # an fp8 cache widens (its K scale is in scale_log2); else a no-op
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [M, N]
    visible = n_ok[None, :] & (n[None, :] <= qpos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new, m_safe = _running_max(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    o_ptr,
    lse_ptr,
    qsl_ptr,
    seqlen_ptr,
    bt_ptr,
    tile_ptr,
    kn_ptr,
    vn_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    q_stride_t,
    q_stride_h,
    kn_stride_t,
    vn_stride_t,
    o_stride_t,
    o_stride_h,
    o_stride_split,
    bt_stride,
    kc_stride_blk,
    kc_stride_slot,
    kc_stride_head,
    scale_log2,
    k_inv,
    v_inv,
    v_scale,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    Q_F16: tl.constexpr,
    HEADS_FAST: tl.constexpr,
    USE_PDL: tl.constexpr,
    FUSE_NEW: tl.constexpr,
    CLAMP_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    TILE_MAP: tl.constexpr,
    WIDEN_V: tl.constexpr,
):
    if not FUSE_NEW:
        # the new tokens' K/V come from rope_and_cache, the kernel before this one: wait first, in
        # every program (the early return below must not skip it)
        pdl.wait(USE_PDL)
        pdl.launch_dependents(USE_PDL)
    if TILE_MAP:  # grid (heads, tile map entries): the map names each program's sequence and q tile
        seq = tl.load(tile_ptr + 2 * tl.program_id(1))
        if seq < 0:  # an entry past the step's tiles
            return
        qt = tl.load(tile_ptr + 2 * tl.program_id(1) + 1)
        kvh = tl.program_id(0)
        split = 0
    elif HEADS_FAST:  # grid (heads x splits, q tiles, sequences): one sequence's heads run side by side
        seq = tl.program_id(2)
        kvh = tl.program_id(0) // NUM_SPLITS
        split = tl.program_id(0) % NUM_SPLITS
        qt = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kvh = tl.program_id(2) // NUM_SPLITS
        split = tl.program_id(2) % NUM_SPLITS
        qt = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - q_start
    if qt * BLOCK_Q >= qlen:
        if FUSE_NEW:
            pdl.wait(USE_PDL)
            pdl.launch_dependents(USE_PDL)
        return
    ctx = tl.load(seqlen_ptr + seq)

    m = tl.arange(0, BLOCK_M)
    tok = qt * BLOCK_Q + m // G
    head = kvh * G + m % G
    row_ok = (tok < qlen) & (m < BLOCK_Q * G)
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q_at = q_ptr + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h
    qpos = ctx - qlen + tok

    last_tok = tl.minimum(qt * BLOCK_Q + BLOCK_Q, qlen) - 1
    kv_end = ctx - qlen + last_tok + 1
    # this split's share of the key range, in whole BLOCK_N tiles
    tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    kv_lo = split * per_split * BLOCK_N
    kv_hi = tl.minimum(kv_lo + per_split * BLOCK_N, kv_end)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if FUSE_NEW:
        # Decode with the new token fused in. Everything the previous kernel (the QKV projection)
        # did not write is read before waiting for it: the step's inputs, cos/sin, and the first
        # key tile of the cached context (written by earlier steps). The new key (position ctx - 1)
        # comes from registers, so the key range stops one short of it.
        owner = (kv_lo <= ctx - 1) & (ctx - 1 < kv_hi)
        kv_hi = tl.minimum(kv_hi, ctx - 1)
        half: tl.constexpr = HEAD_DIM // 2
        t_new = q_start.to(tl.int64)  # the sequence's one new token
        pos = tl.load(pos_ptr + t_new)
        slot = tl.load(slot_ptr + t_new)
        partner = (d + half) % HEAD_DIM
        # rotate half: channel c < D/2 gets x[c] cos - x[c + D/2] sin, channel c >= D/2 gets
        # x[c] cos + x[c - D/2] sin; cos/sin rounded to the activations' dtype first, as
        # elementwise.rope_and_cache and transformers do
        act = q_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + pos * half + d % half).to(act).to(tl.float32)
        sin = tl.load(sin_ptr + pos * half + d % half).to(act).to(tl.float32)
        sin = tl.where(d < half, -sin, sin)
        k0, v0, n0, ok0 = _kv_tile(kc_ptr, vc_ptr, bt_row, kv_lo, kv_hi, kvh, d, kc_stride_blk,
                                   kc_stride_slot, kc_stride_head, PAGE, BLOCK_N, WIDEN_V)  # fmt: skip
        pdl.wait(USE_PDL)
        pdl.launch_dependents(USE_PDL)
        q = tl.load(q_at + d[None, :], mask=row_ok[:, None], other=0.0)
        q_sw = tl.load(q_at + partner[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * cos[None, :] + q_sw * sin[None, :]).to(act)
        # the new key and value of this program's KV head, rounded to the cache's element type
        kn_row = kn_ptr + t_new * kn_stride_t + kvh * HEAD_DIM
        k_new = tl.load(kn_row + d).to(tl.float32) * cos + tl.load(kn_row + partner).to(tl.float32) * sin
        v_new = tl.load(vn_ptr + t_new * vn_stride_t + kvh * HEAD_DIM + d).to(tl.float32)
        if CLAMP_FP8:
            k_new = fp8_range(k_new, k_inv, FP8_MAX)
            v_new = fp8_range(v_new, v_inv, FP8_MAX)
        k_new = k_new.to(kc_ptr.dtype.element_ty)
        v_new = v_new.to(vc_ptr.dtype.element_ty)
        if owner & (slot >= 0):
            kv_at = (slot // PAGE) * kc_stride_blk + (slot % PAGE) * kc_stride_slot + kvh * kc_stride_head + d
            tl.store(kc_ptr + kv_at, k_new)
            tl.store(vc_ptr + kv_at, v_new)
        q = _dot_dtype(q, Q_F16)
        m_i, l_i, acc = _attend_tile(q, k0, v0, n0, ok0, qpos, m_i, l_i, acc, scale_log2, PRECISION)
        first = kv_lo + BLOCK_N
    else:
        q = _dot_dtype(tl.load(q_at + d[None, :], mask=row_ok[:, None], other=0.0), Q_F16)
        first = kv_lo
    for start in range(first, kv_hi, BLOCK_N):
        k, v, n, n_ok = _kv_tile(kc_ptr, vc_ptr, bt_row, start, kv_hi, kvh, d, kc_stride_blk,
                                 kc_stride_slot, kc_stride_head, PAGE, BLOCK_N, WIDEN_V)  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, n, n_ok, qpos, m_i, l_i, acc, scale_log2, PRECISION)
    if FUSE_NEW:
        # fold the new key in like one more key tile (masked off unless this program owns it)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(q.dtype).to(tl.float32)[None, :], axis=1) * scale_log2
        s_new = tl.where(owner, s_new, float("-inf"))
        m_new, m_safe = _running_max(m_i, s_new)
        p = tl.exp2(s_new - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + p
        pv = p.to(q.dtype).to(tl.float32)[:, None] * v_new.to(q.dtype).to(tl.float32)[None, :]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if CLAMP_FP8:
        # an fp8 cache holds V / v_scale (K's scale is in scale_log2); the partials are linear in acc
        acc = acc * v_scale
    o_rows = q_rows[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + o_rows, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # float32 partials: acc relative to this split's running max m_i (log2 domain), and l_i;
        # rows of the partial buffers are (token * num_heads + head), splits outermost
        tl.store(o_ptr + split * o_stride_split + o_rows, acc, mask=row_ok[:, None])
        ml_off = split * (o_stride_split // HEAD_DIM) + q_rows * (o_stride_t // HEAD_DIM) + head
        tl.store(lse_ptr + ml_off, m_i, mask=row_ok)
        tl.store(lse_ptr + (o_stride_split // HEAD_DIM) * NUM_SPLITS + ml_off, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_ptr, ml_ptr, o_ptr, rows_per_split, o_stride_row,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # the next kernel (the output projection) may launch at once, not after this kernel's wait (the
    # exception to pdl.py's rule): this launch is one warp per row and holds almost no SM slots, and
    # the projection only loads weights before its own wait, so its programs load their first tiles
    # while attention still runs (H100 W3: docs/benchmarks.md, ninth session)
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    # one program per (token, head) row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, NUM_SPLITS)
    m_s = tl.load(ml_ptr + s * rows_per_split + r)
    l_s = tl.load(ml_ptr + (NUM_SPLITS + s) * rows_per_split + r)
    mx = tl.max(m_s, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(l_s == 0.0, 0.0, tl.exp2(m_s - mx))
    acc = tl.load(part_ptr + (s[:, None] * rows_per_split + r) * HEAD_DIM + d[None, :])
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l_s * w, axis=0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + r * o_stride_row + d, out.to(o_ptr.dtype.element_ty))


LOG2E = 1.0 / math.log(2.0)
# launch choices, from bench/attention_bench.py on the H100 (docs/benchmarks.md has the table): an
# fp8 cache streams half the bytes per tile, so its decode tiles are twice as long; two deep since
# V is widened in its load layout (sixteenth session: its fp16 staging took the third stage's room)
DEFAULT_TUNING: dict[str, Any] = {
    "decode_block_n": 64,
    "decode_block_n_fp8": 128,
    "num_warps": 4,
    "num_stages": 2,
    "num_stages_fp8": 2,
    "heads_fast": True,  # a sequence's KV heads run side by side (its pages are read together)
    "fp8_f16_dots": True,  # fp8 cache, bf16 model: fp16 dots (see Q_F16)
    "fp8_widen_v": True,  # fp8 cache on sm_89+: V widened in its load layout (_widen_e4m3_words)
    # A tile-map launch (cuda_graphs.MixedGraphs' steps: prompt chunks beside decodes): query tiles
    # of map_tile_rows (token, head) rows, i.e. 16 // G tokens (4 for Llama's G = 4; map_block_q sets
    # the tokens instead), keys per tile, warps and stages, each with the fp8 cache's own value.
    # H100, Llama-8B attention, a 256-token chunk (512 cached) beside 256/192/128/64/32 W1-like
    # decodes, us per layer, GPU time of graph replays (bench/mixed_attention_bench.py, eighteenth
    # session): bf16 cache, 64-row tiles of 64 keys, 4 warps, 3 stages (the seventeenth session's
    # pick) 395.2/315.8/216.1/114.5/71.5 -> 16-row tiles, 64 keys, 2 warps, 3 stages
    # 371.0/299.6/205.3/110.1/77.9; fp8 cache, 64-row tiles 395.2/320.5/223.3/121.8/88.4 -> 16-row
    # tiles, 128 keys, 4 warps, 2 stages 250.8/205.1/149.7/92.9/66.0. The decode rows no longer sit
    # in 64-row tiles, three quarters empty; the chunk's keys are read four times as often.
    "map_tile_rows": 16,
    "map_block_q": None,  # query tokens per tile; None: map_tile_rows // G (map_block_q())
    "map_block_n": 64,
    "map_block_n_fp8": 128,
    "map_num_warps": 2,
    "map_num_warps_fp8": 4,
    "map_num_stages": 3,
    "map_num_stages_fp8": 2,
}


def decode_tiles(context: int, cache_dtype: torch.dtype) -> int:
    """Key tiles a decode launch with the default tuning walks over a context of `context` tokens
    (the unit of cuda_graphs.decode_splits)."""
    keys = DEFAULT_TUNING["decode_block_n_fp8" if cache_dtype == FP8_DTYPE else "decode_block_n"]
    return -(-context // keys)


def prefill_block_q(group: int) -> int:
    """Query tokens per program of a prefill grid launch (max_query_len > 1, no tile map) for a
    model with `group` query heads per KV head: their (token, head) rows fill a 64-row MMA tile."""
    return max(1, 64 // group)


def map_block_q(group: int, tuning: dict[str, Any] = DEFAULT_TUNING) -> int:
    """Query tokens per tile of a map launch under `tuning` (its "map_block_q", else as many as fill
    "map_tile_rows" rows); with the default tuning, what fill_tile_map and tile_map_entries assume
    unless told otherwise."""
    return tuning["map_block_q"] or max(1, tuning["map_tile_rows"] // group)


def tile_map_entries(tokens: int, max_seqs: int, group: int, block_q: int | None = None) -> int:
    """The most (sequence, query tile) pairs a step of at most `tokens` new tokens over at most
    `max_seqs` sequences can have: each sequence's tiles number ceil(qlen / block_q), which sums to
    at most tokens / block_q plus one partial tile per sequence. `block_q`: query tokens per tile,
    map_block_q(group) unless given (a launch with another `map_block_q` tuning)."""
    return tokens // (block_q or map_block_q(group)) + min(tokens, max_seqs)


def fill_tile_map(
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    group: int,
    out: np.ndarray,
    decode: bool = False,
    block_q: int | None = None,
) -> int:
    """Write a step's (sequence, query tile) pairs into `out` (int32 [P, 2]) for
    paged_attention(tile_map=...), the tiles with the most keys to read first (the longest programs
    start in the first wave, not the last), and -1 into the entries after them; returns the count.
    query_lens and seq_lens: int arrays, one entry per sequence of the step (query length 0: the
    sequence is left out). `decode`: for a launch with max_query_len 1 (one-token tiles), which
    only one-token sequences may take. `block_q`: query tokens per tile of a launch with another
    `map_block_q` tuning than the default (map_block_q(group))."""
    if decode:
        assert (query_lens <= 1).all(), "decode tiles hold one query token"
    bq = 1 if decode else block_q or map_block_q(group)
    counts = (query_lens + bq - 1) // bq
    n = int(counts.sum())
    assert n <= len(out), f"{n} query tiles, the map holds {len(out)}"
    seq = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first = np.cumsum(counts) - counts
    qt = np.arange(n, dtype=np.int32) - np.repeat(first, counts).astype(np.int32)
    # keys a tile reads: the context before the sequence's new tokens plus its last token's causal span
    keys = (seq_lens - query_lens)[seq] + np.minimum((qt + 1) * bq, query_lens[seq])
    order = np.argsort(-keys, kind="stable")
    out[:n, 0] = seq[order]
    out[:n, 1] = qt[order]
    out[n:] = -1
    return n


class NewKV(NamedTuple):
    """A decode step's new tokens for `paged_attention(new_kv=...)`: K and V as the QKV projection
    wrote them (not rotated), and what elementwise.rope_and_cache would take to place them."""

    k: torch.Tensor  # [T, KVH, D] (any token stride, heads packed, D contiguous)
    v: torch.Tensor  # [T, KVH, D] (likewise)
    positions: torch.Tensor  # [T]
    cos: torch.Tensor  # [P, D/2] float32
    sin: torch.Tensor  # [P, D/2] float32
    slot_mapping: torch.Tensor  # [T]; negative = padding, not written


def paged_attention(
    q: torch.Tensor,  # [T, H, D] (any token/head strides, D contiguous)
    k_cache: torch.Tensor,  # [NB, PAGE, KVH, D] (any block/slot/head strides, D contiguous)
    v_cache: torch.Tensor,  # the same shape and strides
    out: torch.Tensor,  # [T, H, D] contiguous
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, W] int32
    max_query_len: int,
    scale: float,
    num_splits: int = 1,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    tuning: dict[str, Any] | None = None,
    new_kv: NewKV | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
    tile_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grid sizes depend only on (B, max_query_len, num_splits), never on context lengths, so a
    decode call (max_query_len == 1) can be captured in a CUDA graph and replayed for any contexts.

    `new_kv` (decode only): q is not rotated yet and the new tokens are not in the cache; the kernel
    rotates q and K, writes K and V into their slots and attends over them (module docstring); q is
    left as it was. Without it the caller has run rope_and_cache first.

    `kv_scale` (an fp8 cache): the cache holds K / kv_scale[0] and V / kv_scale[1]; K's scale joins
    the softmax scale, V's multiplies the output, and new_kv's K/V are divided by them when written.

    `tile_map` (int32 [P, 2], from fill_tile_map): one program per KV head and entry, working on the
    entry's (sequence, query tile); entries whose sequence is -1 do nothing. The grid then depends
    only on P, not on the batch, so a step with prefill chunks can be captured in a CUDA graph
    (cuda_graphs.MixedGraphs) with the map, like the other inputs, in a fixed buffer. Query tiles
    are map_block_q(G, tuning) tokens (the map must have been filled with that size), or one where
    max_query_len is 1 (decode tiles: the map must then name one-token sequences only); no splits,
    no new_kv.

    `tuning` overrides launch choices for bench/attention_bench.py's sweep (keys of DEFAULT_TUNING)."""
    t, h, d = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    b = seq_lens.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.is_contiguous()
    assert v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype
    fp8_cache = k_cache.dtype == FP8_DTYPE
    tune = DEFAULT_TUNING if tuning is None else {**DEFAULT_TUNING, **tuning}
    # PTX (sm_89+): the interpreter (CPU tensors) runs none; int32 words need 4-byte alignment
    widen_v = (
        fp8_cache and bool(tune["fp8_widen_v"]) and sm89(q.device)
        and d % 4 == 0 and k_cache.data_ptr() % 4 == 0 and v_cache.data_ptr() % 4 == 0
        and all(st % 4 == 0 for st in k_cache.stride()[:3])
    )  # fmt: skip
    map_launch = tile_map is not None and max_query_len > 1  # query tiles over a map: map_* tuning
    fp8 = "_fp8" if fp8_cache else ""  # the fp8 cache's own tuning keys
    warps, stages = tune["num_warps"], tune["num_stages" + fp8]
    if max_query_len == 1:
        block_q, block_n = 1, tune["decode_block_n" + fp8]
    elif map_launch:
        block_q, block_n = map_block_q(g, tune), tune["map_block_n" + fp8]
        warps, stages = tune["map_num_warps" + fp8], tune["map_num_stages" + fp8]
    else:
        block_q, block_n = prefill_block_q(g), 64
    block_m = max(16, triton.next_power_of_2(block_q * g))
    heads_fast = bool(tune["heads_fast"]) and b <= 65535  # grid dimension 2 holds at most 65535
    if tile_map is not None:
        assert num_splits == 1 and new_kv is None, "a tile map takes no splits and no new_kv"
        assert tile_map.dtype == torch.int32 and tile_map.shape[1] == 2 and tile_map.is_contiguous()
        grid = (kvh, tile_map.shape[0], 1)
    else:
        qtiles = triton.cdiv(max_query_len, block_q)
        grid = (kvh * num_splits, qtiles, b) if heads_fast else (b, qtiles, kvh * num_splits)
    use_pdl = pdl.enabled()
    if new_kv is not None:
        assert max_query_len == 1, "new_kv is for decode batches"
        for x in (new_kv.k, new_kv.v):
            assert x.shape == (t, kvh, d) and x.stride(1) == d and x.stride(2) == 1
        nk = new_kv
    else:
        nk = NewKV(q, q, seq_lens, q, q, seq_lens)  # unused (FUSE_NEW off)
    if num_splits == 1:
        part, ml = out, out  # ml unused
        o_stride_split = 0
    else:
        assert max_query_len == 1, "split-KV is for decode batches"
        assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
        part, ml = workspace if workspace is not None else split_workspace(t, h, d, num_splits, q.device)
        o_stride_split = t * h * d
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        part,
        ml,
        query_start_loc,
        seq_lens,
        block_tables,
        tile_map if tile_map is not None else seq_lens,  # unused without a map
        nk.k,
        nk.v,
        nk.positions,
        nk.cos,
        nk.sin,
        nk.slot_mapping,
        q.stride(0),
        q.stride(1),
        nk.k.stride(0),
        nk.v.stride(0),
        h * d,
        d,
        o_stride_split,
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        scale * LOG2E * (kv_scale[0] if fp8_cache else 1.0),
        1.0 / kv_scale[0],
        1.0 / kv_scale[1],
        kv_scale[1],
        G=g,
        HEAD_DIM=d,
        PAGE=k_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        # float32 models get exact float32 dots (the default would be tf32)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        Q_F16=fp8_cache and q.dtype == torch.bfloat16 and bool(tune["fp8_f16_dots"]),
        HEADS_FAST=heads_fast,
        USE_PDL=use_pdl,
        FUSE_NEW=new_kv is not None,
        CLAMP_FP8=fp8_cache,
        FP8_MAX=FP8_MAX,
        TILE_MAP=tile_map is not None,
        WIDEN_V=widen_v,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=use_pdl,
        **LAUNCH_OPTIONS,
    )
    if num_splits > 1:
        _merge_kernel[(t * h,)](
            part, ml, out, t * h, d, HEAD_DIM=d, NUM_SPLITS=num_splits, USE_PDL=use_pdl,
            num_warps=1, launch_pdl=use_pdl,
            **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def split_workspace(
    t: int, h: int, d: int, num_splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs [S, T, H, D] and (max, sum) pairs [2, S, T, H] for split-KV decode."""
    part = torch.empty((num_splits, t, h, d), dtype=torch.float32, device=device)
    ml = torch.empty((2, num_splits, t, h), dtype=torch.float32, device=device)
    return part, ml
