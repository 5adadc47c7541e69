"""Fused small ops: add + RMSNorm, SiLU-and-mul, rotary embedding + KV-cache write.

Each replaces several torch launches (and their round trips through memory) with one kernel;
under CUDA graphs the launch count per decoder layer is what bounds batch-1 decode latency.
Numerics follow transformers' bf16 path: the residual sum is rounded to the model dtype before
it is normalized, the normalized value is rounded before the weight multiply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant.fp8 import FP8_DTYPE, FP8_MAX
from . import LAUNCH_OPTIONS, num_sms, pdl
from .gemv import argmax_key_index, argmax_key_min
from .rms import rms_rstd, rms_scale


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    x_stride,
    x_inner_stride,
    res_stride,
    out_stride,
    out_inner_stride,
    n_cols,
    n_inner,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    # rows are (outer, inner) pairs: inner > 1 normalizes each head of a [T, H, D] view in place
    r = tl.program_id(0).to(tl.int64)
    outer = r // n_inner
    inner = r % n_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + outer * x_stride + inner * x_inner_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        rv = tl.load(res_ptr + outer * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + rv.to(tl.float32)).to(rv.dtype)
        tl.store(res_ptr + outer * res_stride + cols, x, mask=mask)
    rstd = rms_rstd(x.to(tl.float32), n_cols, eps)
    out = rms_scale(x, tl.load(w_ptr + cols, mask=mask, other=0.0), rstd)
    tl.store(out_ptr + outer * out_stride + inner * out_inner_stride + cols, out, mask=mask)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalize the last dim of x ([T, N], or [T, H, D] per head with any token/head strides).

    With `residual` ([T, N]), first residual += x in place, then normalize the sum.
    `out` may alias x (in-place normalization of q/k heads inside the fused QKV output).
    """
    assert x.stride(-1) == 1
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 3:
        assert residual is None
        t, inner, n = x.shape
        xs, xi, os_, oi = x.stride(0), x.stride(1), out.stride(0), out.stride(1)
    else:
        x = x.reshape(-1, x.shape[-1])
        out = out.view(-1, x.shape[-1])
        t, inner, n = x.shape[0], 1, x.shape[1]
        xs, xi, os_, oi = x.stride(0), 0, out.stride(0), 0
    res = residual if residual is not None else x
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(t * inner,)](
        x,
        res,
        weight,
        out,
        xs,
        xi,
        res.stride(0),
        os_,
        oi,
        n,
        inner,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        USE_PDL=pdl.enabled(),
        num_warps=min(max(block // 256, 1), 8),
        launch_pdl=pdl.enabled(),
        **LAUNCH_OPTIONS,
    )
    return out


# sizes that change from step to step are not specialized on (Triton compiles a variant for an
# integer argument of 1 or a multiple of 16): each variant would compile while serving
@triton.jit(do_not_specialize=["n_words", "words_per_row", "tab_rows", "tab_width"])
def _embed_rmsnorm_kernel(
    ids_ptr,
    feed_ptr,
    prev_ptr,
    emb_ptr,
    w_ptr,
    res_ptr,
    out_ptr,
    emb_stride,
    n_cols,
    eps,
    src_words_ptr,
    dst_words_ptr,
    n_words,
    words_per_row,
    src_tab_ptr,
    dst_tab_ptr,
    src_tab_stride,
    dst_tab_stride,
    tab_rows,
    tab_width,
    HAS_FEED: tl.constexpr,
    STAGED: tl.constexpr,
    BLOCK: tl.constexpr,
    WORDS_BLOCK: tl.constexpr,
    TAB_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # one program per token: its id (from the previous step's sampled ids where the feed says so),
    # its embedding row into the residual stream, and that row normalized (as _rmsnorm_kernel);
    # STAGED: also copies a step's staged inputs into the buffers its graph reads (a slice of the
    # packed per-row fields, and the block table of row r where r < tab_rows)
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    r = tl.program_id(0).to(tl.int64)
    if STAGED:
        lo = r * words_per_row
        hi = tl.minimum(lo + words_per_row, n_words)
        for w0 in range(lo, hi, WORDS_BLOCK):
            w = w0 + tl.arange(0, WORDS_BLOCK)
            tl.store(dst_words_ptr + w, tl.load(src_words_ptr + w, mask=w < hi), mask=w < hi)
        tab_cols = tab_width
        if r >= tab_rows:
            tab_cols = 0
        for c0 in range(0, tab_cols, TAB_BLOCK):
            c = c0 + tl.arange(0, TAB_BLOCK)
            ok = c < tab_width
            t = tl.load(src_tab_ptr + r * src_tab_stride + c, mask=ok)
            tl.store(dst_tab_ptr + r * dst_tab_stride + c, t, mask=ok)
    tok = tl.load(ids_ptr + r)
    if HAS_FEED:
        src = tl.load(feed_ptr + r)
        if src >= 0:
            tok = tl.load(prev_ptr + src)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(emb_ptr + tok * emb_stride + cols, mask=mask, other=0.0)
    tl.store(res_ptr + r * n_cols + cols, x, mask=mask)
    rstd = rms_rstd(x.to(tl.float32), n_cols, eps)
    y = rms_scale(x, tl.load(w_ptr + cols, mask=mask, other=0.0), rstd)
    tl.store(out_ptr + r * n_cols + cols, y, mask=mask)


_STAGE_BLOCK = 256  # int32 words a program moves per load of embed_rmsnorm's staged copy


@dataclass
class StagedInputs:
    """A step's inputs staged on the device, for embed_rmsnorm to copy into the buffers a CUDA graph
    reads: `words` (int32 view of the packed per-row fields; may be empty) into `words_out`, and
    the first `width` columns of `tables`' first `rows` rows (default: one per token) into
    `tables_out` (int32 [>= rows, >= width] each, any row strides)."""

    words: torch.Tensor
    words_out: torch.Tensor
    tables: torch.Tensor
    tables_out: torch.Tensor
    width: int
    rows: int | None = None


def embed_rmsnorm(
    ids: torch.Tensor,
    embedding: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    feed: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    staged: StagedInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T] -> (embedding rows [T, H], those rows RMS-normalized by `weight`), in one launch: the
    first layer's input and the residual stream, as embedding(ids) then rmsnorm give them.

    `feed` = (rows [T] int64, previous [R] int64): where rows[t] >= 0 the token's id is
    previous[rows[t]] instead of ids[t] (an input taken on the device from the step before's
    sampled ids). `out`: the two [T, H] tensors to write. `staged`: the same launch also moves a
    decode step's inputs into its graph's buffers (cuda_graphs.DecodeGraphs)."""
    t = ids.shape[0]
    n = embedding.shape[1]
    assert embedding.stride(1) == 1
    if out is None:
        res = torch.empty((t, n), dtype=embedding.dtype, device=ids.device)
        y = torch.empty_like(res)
    else:
        res, y = out
    assert res.shape == y.shape == (t, n) and res.is_contiguous() and y.is_contiguous()
    if not t:
        return res, y
    rows, prev = feed if feed is not None else (ids, ids)
    st = staged
    if st is not None:
        assert st.words.dtype == st.words_out.dtype == torch.int32 and st.words.shape == st.words_out.shape
        tab_rows = t if st.rows is None else st.rows
        assert tab_rows <= t and st.tables.shape[0] >= tab_rows and st.tables_out.shape[0] >= tab_rows
        assert st.tables.stride(1) == st.tables_out.stride(1) == 1
    block = triton.next_power_of_2(n)
    _embed_rmsnorm_kernel[(t,)](
        ids, rows, prev, embedding, weight, res, y, embedding.stride(0), n, eps,
        *(
            (st.words, st.words_out, st.words.numel(), triton.cdiv(st.words.numel(), t), st.tables,
             st.tables_out, st.tables.stride(0), st.tables_out.stride(0), tab_rows, st.width)
            if st is not None else (ids, ids, 0, 0, ids, ids, 0, 0, 0, 0)
        ),
        # fixed chunks (the runtime sizes vary by step: a constexpr per size would compile a
        # variant per batch size and block-table width while serving)
        HAS_FEED=feed is not None, STAGED=st is not None, BLOCK=block, WORDS_BLOCK=_STAGE_BLOCK,
        TAB_BLOCK=_STAGE_BLOCK, USE_PDL=pdl.enabled(), num_warps=min(max(block // 256, 1), 8),
        launch_pdl=pdl.enabled(),
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return res, y


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, n_inter, x_stride, out_stride, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_inter
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * x_stride + n_inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(
        out_ptr + row * out_stride + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> silu(gate) * up: [T, I]."""
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    block = 1024
    use_pdl = pdl.enabled()
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        x,
        out,
        inter,
        x.stride(0),
        out.stride(0),
        BLOCK=block,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        **LAUNCH_OPTIONS,
    )
    return out


@triton.jit
def fp8_range(x, inv, FP8_MAX: tl.constexpr):
    """float32 values -> what an fp8 KV cache stores before the cast: x times 1 / the cache's scale,
    clamped to +-FP8_MAX (layers/attention.to_fp8_cache)."""
    return tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    qkv_stride,
    kc_stride_blk,
    kc_stride_slot,
    kc_stride_head,
    k_inv,
    v_inv,
    NUM_HEADS: tl.constexpr,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    USE_PDL: tl.constexpr,
    CLAMP_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    # one program per token: rotate q in place, rotate k and write k, v into their cache slot
    # (cast to the cache's element type; an fp8 cache takes them times 1 / its scale, k_inv and
    # v_inv, clamped to +-FP8_MAX (448): layers/attention.to_fp8_cache)
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, half)
    cos = tl.load(cos_ptr + pos * half + d)[None, :]
    sin = tl.load(sin_ptr + pos * half + d)[None, :]
    row = qkv_ptr + t * qkv_stride

    h = tl.arange(0, BLOCK_H)
    hm = (h < NUM_HEADS)[:, None]
    qp = row + h[:, None] * HEAD_DIM + d[None, :]
    q1 = tl.load(qp, mask=hm, other=0.0)
    q2 = tl.load(qp + half, mask=hm, other=0.0)
    cq = cos.to(q1.dtype).to(tl.float32)
    sq = sin.to(q1.dtype).to(tl.float32)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(qp, (q1f * cq - q2f * sq).to(q1.dtype), mask=hm)
    tl.store(qp + half, (q2f * cq + q1f * sq).to(q1.dtype), mask=hm)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        kh = tl.arange(0, BLOCK_KV)
        km = (kh < NUM_KV)[:, None]
        kp = row + NUM_HEADS * HEAD_DIM + kh[:, None] * HEAD_DIM + d[None, :]
        k1 = tl.load(kp, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(kp + half, mask=km, other=0.0).to(tl.float32)
        dst = kc_ptr + blk * kc_stride_blk + off * kc_stride_slot + kh[:, None] * kc_stride_head + d[None, :]
        kr1 = k1 * cq - k2 * sq
        kr2 = k2 * cq + k1 * sq
        vp = row + (NUM_HEADS + NUM_KV) * HEAD_DIM + kh[:, None] * HEAD_DIM + d[None, :]
        v1 = tl.load(vp, mask=km, other=0.0)
        v2 = tl.load(vp + half, mask=km, other=0.0)
        if CLAMP_FP8:
            kr1 = fp8_range(kr1, k_inv, FP8_MAX)
            kr2 = fp8_range(kr2, k_inv, FP8_MAX)
            v1 = fp8_range(v1.to(tl.float32), v_inv, FP8_MAX)
            v2 = fp8_range(v2.to(tl.float32), v_inv, FP8_MAX)
        tl.store(dst, kr1.to(kc_ptr.dtype.element_ty), mask=km)
        tl.store(dst + half, kr2.to(kc_ptr.dtype.element_ty), mask=km)
        vdst = vc_ptr + blk * kc_stride_blk + off * kc_stride_slot + kh[:, None] * kc_stride_head + d[None, :]
        tl.store(vdst, v1.to(vc_ptr.dtype.element_ty), mask=km)
        tl.store(vdst + half, v2.to(vc_ptr.dtype.element_ty), mask=km)


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) * D], q/k already normalized if the model does that
    positions: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [P, D/2] float32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; negative = padding, not written
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_scale: tuple[float, float] = (1.0, 1.0),  # an fp8 cache's (K, V) scales (stored = value / scale)
) -> None:
    t = qkv.shape[0]
    if t == 0:
        return
    assert k_cache.stride(3) == 1 and qkv.stride(1) == 1
    assert v_cache.dtype == k_cache.dtype and v_cache.stride() == k_cache.stride()
    _rope_cache_kernel[(t,)](
        qkv,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        qkv.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        1.0 / kv_scale[0],
        1.0 / kv_scale[1],
        NUM_HEADS=num_heads,
        NUM_KV=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        USE_PDL=pdl.enabled(),
        CLAMP_FP8=k_cache.dtype == FP8_DTYPE,
        FP8_MAX=FP8_MAX,
        num_warps=4,
        launch_pdl=pdl.enabled(),
        **LAUNCH_OPTIONS,
    )


_NO_INDEX = 2**31 - 1


@triton.jit
def _lane_best(best_v, best_i, v, i, ok, NO_INDEX: tl.constexpr):
    """Each lane's running maximum: the first value it saw that is strictly larger (chunks come in
    order), and the lane's first element seeds it (so a row of -inf still gets an index)."""
    take = (v > best_v) | ((best_i == NO_INDEX) & ok)
    return tl.where(take, v, best_v), tl.where(take, i, best_i)


@triton.jit
def _first_at_max(best_v, best_i, NO_INDEX: tl.constexpr):
    """The smallest index among the lanes that hold the row's maximum."""
    top = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == top, best_i, NO_INDEX), axis=0)


@triton.jit
def _scan_lanes(row, lo, hi, BLOCK: tl.constexpr, NO_INDEX: tl.constexpr):
    """Columns lo .. hi of a row in chunks of BLOCK: each lane's first maximum (value, index) and
    first NaN index (NO_INDEX where none)."""
    offs = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], NO_INDEX, tl.int32)
    nan_i = tl.full([BLOCK], NO_INDEX, tl.int32)
    for start in range(lo, hi, BLOCK):
        i = start + offs
        ok = i < hi
        v = tl.load(row + i, mask=ok, other=float("-inf")).to(tl.float32)
        best_v, best_i = _lane_best(best_v, best_i, v, i, ok, NO_INDEX)
        nan_i = tl.minimum(nan_i, tl.where(v != v, i, NO_INDEX))
    return best_v, best_i, nan_i


@triton.jit
def _argmax_rows_kernel(x_ptr, out_ptr, V, stride, BLOCK: tl.constexpr, NO_INDEX: tl.constexpr):
    # one program per row; each lane keeps the first maximum it saw and the first NaN it saw; then
    # the row's first NaN if any, else the smallest index holding the max
    r = tl.program_id(0).to(tl.int64)
    best_v, best_i, nan_i = _scan_lanes(x_ptr + r * stride, 0, V, BLOCK, NO_INDEX)
    first_nan = tl.min(nan_i, axis=0)
    at_top = _first_at_max(best_v, best_i, NO_INDEX)
    tl.store(out_ptr + r, tl.where(first_nan < NO_INDEX, first_nan, at_top).to(tl.int64))


@triton.jit
def _argmax_split_kernel(
    x_ptr, out_ptr, part_ptr, ticket_ptr, V, stride, CHUNK,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr, NO_INDEX: tl.constexpr,
):  # fmt: skip
    # program (row, s) scans columns [s CHUNK, (s + 1) CHUNK) as _argmax_rows_kernel scans a row and
    # writes its (max, index of its first max, first NaN); the row's last program to finish (a
    # ticket per row, as in gemv.add_norm_epilogue) reduces the SPLITS partials in order
    r = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    lo = sp * CHUNK
    best_v, best_i, nan_i = _scan_lanes(x_ptr + r * stride, lo, tl.minimum(lo + CHUNK, V), BLOCK, NO_INDEX)
    at = part_ptr + (r * SPLITS + sp) * 3  # (max as float32 bits, index, first NaN) as int32
    tl.store(at, tl.max(best_v, axis=0).to(tl.int32, bitcast=True))
    tl.store(at + 1, _first_at_max(best_v, best_i, NO_INDEX))
    tl.store(at + 2, tl.min(nan_i, axis=0))
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + r, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
        s = tl.arange(0, SPLITS)
        p = part_ptr + (r * SPLITS + s) * 3
        top_v = tl.load(p, cache_modifier=".cg").to(tl.float32, bitcast=True)
        top_i = tl.load(p + 1, cache_modifier=".cg")
        first_nan = tl.min(tl.load(p + 2, cache_modifier=".cg"), axis=0)
        at_top = _first_at_max(top_v, top_i, NO_INDEX)  # chunks are in order: the first global max
        tl.store(out_ptr + r, tl.where(first_nan < NO_INDEX, first_nan, at_top).to(tl.int64))
        tl.store(ticket_ptr + r, 0)


# per device: int32 tickets, one per row, zero between launches (a row's last program resets its
# own); launches on one stream never overlap. Two stores: the argmax's tickets are baked into the
# one-row decode graphs that capture argmax_rows (cuda_graphs), so that buffer must never be
# replaced while they live: it is allocated at ARGMAX_SPLIT_ROWS, the most rows argmax_rows splits
# by default, and sample_rows (any number of rows, eager) grows a buffer of its own
_ARGMAX_TICKETS: dict[torch.device, torch.Tensor] = {}
_SAMPLE_TICKETS: dict[torch.device, torch.Tensor] = {}
ARGMAX_SPLIT_ROWS = 8  # at most this many rows split each row over programs (a few decode rows)


def _tickets(
    store: dict[torch.device, torch.Tensor], device: torch.device, n: int, least: int
) -> torch.Tensor:
    t = store.get(device)
    if t is None or t.numel() < n:
        # zeroing inside a CUDA-graph capture would only be recorded: eager launches after it would
        # see whatever the memory held (sampling runs outside the decode graphs)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        assert not capturing, "split-row tickets are allocated eagerly"
        t = store[device] = torch.zeros(max(n, least), dtype=torch.int32, device=device)
    return t


def _argmax_tickets(device: torch.device, n: int) -> torch.Tensor:
    return _tickets(_ARGMAX_TICKETS, device, n, ARGMAX_SPLIT_ROWS)


def argmax_rows(
    x: torch.Tensor,
    block: int = 8192,
    num_warps: int = 16,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [N, V] (V contiguous) -> each row's first maximum [N] int64, NaN counting as the largest
    value (torch.argmax's rule), in one launch: greedy sampling of decode rows, where torch's argmax
    (one pass) or a torch two-pass argmax (five launches) cost more than reading the row (the logits
    were just written, so they come from L2). Up to ARGMAX_SPLIT_ROWS rows each row is split over
    `splits` programs (default 16) whose last one reduces their partials: one program per row spent
    13 us on a Llama-3 vocabulary at batch 1 on the H100, the split launch 6 us (docs/benchmarks.md);
    more rows, one program per row (`splits` 1; `block` and `num_warps` are that launch's).
    `out`: an int64 [N] tensor to write the indices into (a decode graph's fixed buffer)."""
    n, v = x.shape
    assert x.stride(1) == 1 and v < _NO_INDEX
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=x.device)
    assert out.shape == (n,) and out.dtype == torch.int64 and out.is_contiguous()
    if not n:
        return out
    if splits is None:
        splits = 16 if n <= ARGMAX_SPLIT_ROWS and x.is_cuda else 1
    if splits == 1:
        _argmax_rows_kernel[(n,)](
            x, out, v, x.stride(0), BLOCK=min(block, triton.next_power_of_2(v)), NO_INDEX=_NO_INDEX,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )  # fmt: skip
        return out
    assert splits & (splits - 1) == 0, "splits: a power of two"
    chunk = triton.cdiv(triton.cdiv(v, splits), 64) * 64
    part = torch.empty((n, splits, 3), dtype=torch.int32, device=x.device)
    _argmax_split_kernel[(n, splits)](
        x, out, part, _argmax_tickets(x.device, n), v, x.stride(0), chunk,
        SPLITS=splits, BLOCK=min(2048, triton.next_power_of_2(chunk)), NO_INDEX=_NO_INDEX, num_warps=4,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


@triton.jit
def _argmax_finish_kernel(best_ptr, out_ptr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    key = tl.atomic_xchg(best_ptr, argmax_key_min(), sem="acq_rel", scope="gpu")
    tl.store(out_ptr, argmax_key_index(key))


ARGMAX_KEY_MIN = -(2**63)  # gemv.argmax_key_min: what a best key holds between launches


def argmax_finish(best: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [1] int64 <- the token id of the key a launch with `gemv(argmax_best=best)` left in
    best, which goes back to ARGMAX_KEY_MIN for the next launch; one program, after that launch."""
    assert best.dtype == out.dtype == torch.int64 and best.numel() == out.numel() == 1
    _argmax_finish_kernel[(1,)](
        best, out, USE_PDL=pdl.enabled(), num_warps=1, launch_pdl=pdl.enabled(), **LAUNCH_OPTIONS
    )
    return out


# the draw's logarithms through the SFU's lg2.approx (one MUFU each) instead of logf's polynomial
# (~20 instructions each; with them the launch was bound by its arithmetic at 256 rows of a Llama-3
# vocabulary): 87 -> 50 SASS instructions per column (offline count), on the H100 137 rows 64.2 ->
# 41.8 us, 256 rows 117.2 -> 75.0, the same token from the same seeds in every row of that bench
# (docs/benchmarks.md, nineteenth session). Triton's interpreter runs no PTX: there the draw keeps
# tl.log (the same distribution)
FAST_LOG = os.environ.get("TRITON_INTERPRET") != "1"
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _lg2_approx(x):
    """log2(x), absolute error ~2^-22 (PTX lg2.approx.f32): 0 -> -inf, inf -> inf."""
    return tl.inline_asm_elementwise(
        "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _gumbel(u, FAST: tl.constexpr):
    """-log(-log u) for u uniform in [0, 1): Gumbel noise, +inf never, -inf at u = 0. FAST: E = -log u
    from lg2.approx where 1 - u >= 2^-6 (relative error ~1e-5 there), else from its series in d = 1
    - u (exact for u above 1/2, truncation below 2^-26 relative); the large-noise draws, u near 1, are
    the ones an absolute log2 error would distort. Then log E through lg2.approx (absolute ~1.5e-7)."""
    if FAST:
        d = 1.0 - u
        e = tl.where(d < 0.015625, d * (1.0 + d * (0.5 + d * (1.0 / 3.0 + d * 0.25))), -_LN2 * _lg2_approx(u))
        return -_LN2 * _lg2_approx(e)
    return -tl.log(-tl.log(u))


@triton.jit
def _race_quarter(best_v, best_i, row, cols, u, inv_t, V, NO_INDEX: tl.constexpr, FAST: tl.constexpr):
    """Fold columns `cols` into each lane's running best of logit / T + Gumbel(u) (the exponential
    race: -log(-log u) = -log E with E = -log u ~ Exp(1), so this is log(p / E) up to the row's
    constant log Z). u = 0 gives -inf: never chosen; NaN logits count as -inf, so the id is always
    one of the row's columns."""
    ok = cols < V
    key = tl.load(row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t + _gumbel(u, FAST)
    key = tl.where(ok & (key == key), key, float("-inf"))
    return _lane_best(best_v, best_i, key, cols, ok, NO_INDEX)


@triton.jit
def _sample_rows_kernel(
    x_ptr, rows_ptr, temp_ptr, seed_ptr, out_ptr, part_ptr, ticket_ptr, V, stride, SPAN,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr, NO_INDEX: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # program (j, s): columns [s SPAN, (s + 1) SPAN) of sampled row j, SPAN a multiple of BLOCK; the
    # noise of column c comes from Philox keyed by the row's seed, four columns per draw (c in the
    # four quarters of a chunk), so the draw does not depend on SPLITS. With SPLITS > 1 each program
    # writes its (best key, first index at it) and the row's last program (a ticket per row, as in
    # _argmax_split_kernel, from a buffer of its own) reduces the SPLITS partials in column order
    j = tl.program_id(0)
    sp = tl.program_id(1)
    r = tl.load(rows_ptr + j)
    inv_t = 1.0 / tl.load(temp_ptr + j).to(tl.float32)
    seed = tl.load(seed_ptr + j)
    row = x_ptr + r * stride
    Q: tl.constexpr = BLOCK // 4
    offs = tl.arange(0, Q)
    best_v = tl.full([Q], float("-inf"), tl.float32)
    best_i = tl.full([Q], NO_INDEX, tl.int32)
    lo = sp * SPAN
    for start in range(lo, tl.minimum(lo + SPAN, V), BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + offs)
        best_v, best_i = _race_quarter(best_v, best_i, row, start + offs, u0, inv_t, V, NO_INDEX, FAST)
        best_v, best_i = _race_quarter(best_v, best_i, row, start + Q + offs, u1, inv_t, V, NO_INDEX, FAST)
        best_v, best_i = _race_quarter(
            best_v, best_i, row, start + 2 * Q + offs, u2, inv_t, V, NO_INDEX, FAST
        )
        best_v, best_i = _race_quarter(
            best_v, best_i, row, start + 3 * Q + offs, u3, inv_t, V, NO_INDEX, FAST
        )
    if SPLITS == 1:
        tl.store(out_ptr + r, _first_at_max(best_v, best_i, NO_INDEX).to(tl.int64))
    else:
        at = part_ptr + (j * SPLITS + sp) * 2  # (best key as float32 bits, its first index) as int32
        tl.store(at, tl.max(best_v, axis=0).to(tl.int32, bitcast=True))
        tl.store(at + 1, _first_at_max(best_v, best_i, NO_INDEX))
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + j, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            p = part_ptr + (j * SPLITS + tl.arange(0, SPLITS)) * 2
            top_v = tl.load(p, cache_modifier=".cg").to(tl.float32, bitcast=True)
            top_i = tl.load(p + 1, cache_modifier=".cg")
            # an empty span keeps (-inf, NO_INDEX): never the first index at the maximum
            tl.store(out_ptr + r, _first_at_max(top_v, top_i, NO_INDEX).to(tl.int64))
            tl.store(ticket_ptr + j, 0)


# sample_rows' default launch: about this many programs per SM, each row split over a power of two
# of spans (at most SAMPLE_MAX_SPLITS) to get there, in chunks of 4,096 columns over 8 warps. Chosen
# on the H100 by bench/sampling_bench.py's sweep (docs/benchmarks.md, nineteenth session): one
# program per row took 111 us for 137 rows of a Llama-3 vocabulary, 16 spans 63; at 256 rows the
# launch is bound by its arithmetic (Philox and two logs per column) whatever the split, 114-116 us
SAMPLE_PROGRAMS_PER_SM = 16
SAMPLE_MAX_SPLITS = 16


def sample_splits(rows: int, vocab: int, block: int, device: torch.device) -> int:
    """How many spans sample_rows splits each of `rows` rows into by default: enough programs for
    SAMPLE_PROGRAMS_PER_SM per SM, a power of two, at most SAMPLE_MAX_SPLITS and no more than the
    row has chunks of `block`."""
    want = triton.cdiv(SAMPLE_PROGRAMS_PER_SM * num_sms(device), max(rows, 1))
    chunks = triton.cdiv(vocab, block)
    splits = 1
    while splits < want and splits * 2 <= min(chunks, SAMPLE_MAX_SPLITS):
        splits *= 2
    return splits


def sample_rows(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    out: torch.Tensor,
    block: int = 4096,
    num_warps: int = 8,
    splits: int | None = None,
    fast_log: bool | None = None,
) -> None:
    """Categorical draws from softmax(logits[rows[j]] / temperatures[j]) into out[rows[j]], in one
    launch and one pass over each row: argmax of logit / T - log(-log U), U uniform from Philox keyed
    by (seeds[j], column). The same seed and logits give the same token whatever else is in the
    launch (for one `block`), whatever `splits`, and whether the logits are float32 or the 16-bit
    values it widens.
    Replaces gather, scale, softmax, an exponential draw the size of the logits, a divide and an
    argmax (each a pass over [rows, V] floats) for rows without top-k / top-p. `splits` (a power of
    two; default sample_splits on CUDA, else 1): programs per row, each over a span of whole
    `block` chunks, the row's last one reducing their partials; one program per row left most SMs
    idle at ~140 rows (docs/benchmarks.md, nineteenth session). `fast_log` (default FAST_LOG): the noise's logarithms
    through lg2.approx (_gumbel)."""
    v = logits.shape[1]
    assert logits.stride(1) == 1 and v < _NO_INDEX and out.dtype == torch.int64
    assert rows.dtype == torch.int64 and seeds.dtype == torch.int64
    n = rows.numel()
    if not n:
        return
    block = max(16, min(block, triton.next_power_of_2(v)))
    if splits is None:
        splits = sample_splits(n, v, block, logits.device) if logits.is_cuda else 1
    assert splits >= 1 and splits & (splits - 1) == 0, "splits: a power of two"
    span = triton.cdiv(triton.cdiv(v, block), splits) * block
    part = tickets = out  # not read by a one-span launch
    if splits > 1:
        part = torch.empty((n, splits, 2), dtype=torch.int32, device=logits.device)
        tickets = _tickets(_SAMPLE_TICKETS, logits.device, n, 256)
    _sample_rows_kernel[(n, splits)](
        logits, rows, temperatures, seeds, out, part, tickets, v, logits.stride(0), span,
        SPLITS=splits, BLOCK=block, NO_INDEX=_NO_INDEX, FAST=FAST_LOG if fast_log is None else fast_log,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
