"""Triton kernels against the torch reference path (collected through tests/gpu/test_kernels.py).

On CPU this file runs in a separate pytest process with TRITON_INTERPRET=1, which executes the
same kernel code with numpy: the interpreter must be chosen before anything imports Triton, and
other test modules (transformers, torch) import it early.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton's interpreter keeps scalars as 1-element numpy arrays and converts them with int(),
    # which NumPy >= 2.4 refuses for arrays of ndim 1; convert through .item() instead.
    from triton.runtime import interpreter as _interp

    _orig_patch_tensor = _interp._patch_lang_tensor

    def _patch_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        _orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_tensor

from inferfleet.worker.config import RopeConfig  # noqa: E402
from inferfleet.worker.kernels.elementwise import (  # noqa: E402
    StagedInputs,
    argmax_rows,
    embed_rmsnorm,
    rmsnorm,
    rope_and_cache,
    sample_rows,
    silu_and_mul,
)
from inferfleet.worker.kernels.paged_attention import (  # noqa: E402
    DEFAULT_TUNING,
    NewKV,
    fill_tile_map,
    map_block_q,
    paged_attention,
    prefill_block_q,
    tile_map_entries,
)
from inferfleet.worker.layers.attention import (  # noqa: E402
    KV_FP8_DTYPE,
    KV_FP8_MAX,
    AttentionMetadata,
    TorchAttentionBackend,
    alloc_kv_cache,
    to_fp8_cache,
    write_kv,
)
from inferfleet.worker.layers.norm import RMSNorm  # noqa: E402
from inferfleet.worker.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_batch(query_lens: list[int], ctx_lens: list[int], page: int, num_blocks: int, seed: int):
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for c in ctx_lens:
        n = -(-c // page)
        tables.append([free.pop() for _ in range(n)])
    width = max(len(t) for t in tables)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    slots = []
    for q, c, t in zip(query_lens, ctx_lens, tables):
        slots += [t[p // page] * page + p % page for p in range(c - q, c)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEV),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEV),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV
        ),
        max_query_len=max(query_lens),
        query_lens_host=query_lens,
        seq_lens_host=ctx_lens,
    )
    return meta


def run_paged_attention(q, k_cache, v_cache, meta, scale, splits, tuning=None):  # type: ignore[no-untyped-def]
    """The kernel over the batch `meta` describes, into a NaN-filled output it must fill entirely."""
    out = torch.full_like(q, float("nan"))
    paged_attention(
        q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, scale, num_splits=splits, tuning=tuning,
    )  # fmt: skip
    assert not out.isnan().any()
    return out


CASES = [
    # (heads, kv heads, head dim, page, query lens, context lens, splits)
    (4, 2, 16, 16, [1, 1, 1], [1, 17, 40], 1),  # decodes, GQA 2
    (8, 2, 32, 16, [5, 1, 33, 16], [5, 30, 80, 16], 1),  # mixed prefill/decode, cached prefixes
    (4, 4, 16, 8, [70], [70], 1),  # MHA, one long prefill, page 8
    (4, 1, 16, 16, [3, 9], [50, 9], 1),  # GQA 4 (Mistral tiny)
    (8, 2, 16, 16, [1, 1], [100, 7], 4),  # split-KV decode
    (4, 2, 16, 16, [1, 1, 1], [1, 3, 65], 8),  # more splits than tiles for short contexts
]


@pytest.mark.parametrize(("h", "kvh", "d", "page", "qlens", "ctx", "splits"), CASES)
def test_paged_attention_matches_reference(h, kvh, d, page, qlens, ctx, splits) -> None:
    torch.manual_seed(0)
    nb = 64
    meta = make_batch(qlens, ctx, page, nb, seed=1)
    t = sum(qlens)
    k_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    v_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    q = torch.randn(t, h, d, dtype=DT, device=DEV)
    k = torch.randn(t, kvh, d, dtype=DT, device=DEV)
    v = torch.randn(t, kvh, d, dtype=DT, device=DEV)
    scale = d**-0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref = TorchAttentionBackend().attend(q, k, v, kc_ref, vc_ref, meta, scale)
    # the kernel reads new K/V from the cache: write them the way rope_and_cache would
    k_cache.view(-1, kvh, d)[meta.slot_mapping] = k
    v_cache.view(-1, kvh, d)[meta.slot_mapping] = v
    out = run_paged_attention(q, k_cache, v_cache, meta, scale, splits)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize(
    ("h", "kvh", "d", "page", "qlens", "ctx", "splits"), [c for c in CASES if c[-1] == 1]
)
def test_paged_attention_tile_map_equals_the_grid_launch(h, kvh, d, page, qlens, ctx, splits) -> None:
    """The tile-map launch (cuda_graphs.MixedGraphs) over buffers as a graph holds them: more token
    rows, sequence entries and table columns than the step uses, stale values past it, and map
    entries of -1. With the grid launch's query tiles, key tiles and warps, every real output row
    equals the grid launch's bit for bit (the same programs in another order; a step of decodes
    alone would take decode tiles, whose sums round otherwise); with the default map tuning (16-row
    tiles) and other tile sizes, within the reference tolerance (other MMA shapes); over an fp8
    cache (its own map tuning), within it of the grid launch over that cache. The padding rows
    stay untouched."""
    torch.manual_seed(0)
    nb = 64
    meta = make_batch(qlens, ctx, page, nb, seed=1)
    t, b, pad_t, pad_b, g = sum(qlens), len(qlens), 7, 3, h // kvh
    k_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    v_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    q = torch.randn(t + pad_t, h, d, dtype=DT, device=DEV)
    meta.max_query_len = max(2, meta.max_query_len)  # prefill tiles, as the map's launch takes
    want = run_paged_attention(q[:t], k_cache, v_cache, meta, d**-0.5, 1)
    qsl = torch.cat([meta.query_start_loc, torch.full((pad_b,), 5, dtype=torch.int32, device=DEV)])
    lens = torch.cat([meta.seq_lens, torch.full((pad_b,), 9, dtype=torch.int32, device=DEV)])
    tables = torch.randint(0, nb, (b + pad_b, meta.block_tables.shape[1] + 16), dtype=torch.int32, device=DEV)
    tables[:b, : meta.block_tables.shape[1]] = meta.block_tables

    def map_launch(
        kc: torch.Tensor, vc: torch.Tensor, block_q: int | None, tuning: dict | None
    ) -> torch.Tensor:
        """The map launch over a map of block_q-token tiles (None: the default size) into NaNs."""
        host = np.zeros((tile_map_entries(t + pad_t, b + pad_b, g, block_q=block_q), 2), dtype=np.int32)
        n = fill_tile_map(np.array(qlens), np.array(ctx), g, host, block_q=block_q)
        assert n == sum(-(-ql // (block_q or map_block_q(g))) for ql in qlens) and (host[n:] == -1).all()
        got = torch.full_like(q, float("nan"))
        paged_attention(
            q, kc, vc, got, qsl, lens, tables, t + pad_t, d**-0.5,
            tile_map=torch.from_numpy(host).to(DEV), tuning=tuning,
        )  # fmt: skip
        assert got[t:].isnan().all()
        return got[:t]

    grid_like = {
        "map_block_q": prefill_block_q(g),
        "map_block_n": 64,
        "map_num_warps": DEFAULT_TUNING["num_warps"],
    }
    assert torch.equal(map_launch(k_cache, v_cache, prefill_block_q(g), grid_like), want)
    for bq in (None, 1, 4):
        assert rel(map_launch(k_cache, v_cache, bq, bq and {"map_block_q": bq}), want) < 1e-5, bq
    k8, v8 = k_cache.to(KV_FP8_DTYPE), v_cache.to(KV_FP8_DTYPE)
    want8 = run_paged_attention(q[:t], k8, v8, meta, d**-0.5, 1)
    assert rel(map_launch(k8, v8, None, None), want8) < 1e-5


def test_paged_attention_decode_tile_map_equals_the_decode_launch() -> None:
    """A tile map over one-token sequences with max_query_len 1 (decode tiles; bench/
    mixed_attention_bench.py's "map split") equals the decode grid launch bit for bit, and a
    sequence left out of the map keeps its output rows untouched."""
    torch.manual_seed(0)
    h, kvh, d, page, nb = 8, 2, 32, 16, 64
    ctx = [1, 17, 40, 90, 33]
    meta = make_batch([1] * len(ctx), ctx, page, nb, seed=2)
    k_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    v_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV)
    q = torch.randn(len(ctx), h, d, dtype=DT, device=DEV)
    want = run_paged_attention(q, k_cache, v_cache, meta, d**-0.5, 1)
    host = np.zeros((len(ctx), 2), dtype=np.int32)
    qlens = np.array([1, 1, 0, 1, 1])  # sequence 2 not in this launch
    assert fill_tile_map(qlens, np.array(ctx), h // kvh, host, decode=True) == 4
    got = torch.full_like(q, float("nan"))
    paged_attention(
        q, k_cache, v_cache, got, meta.query_start_loc, meta.seq_lens, meta.block_tables, 1, d**-0.5,
        tile_map=torch.from_numpy(host).to(DEV),
    )  # fmt: skip
    kept = [0, 1, 3, 4]
    assert torch.equal(got[kept], want[kept])
    assert got[2].isnan().all()


def test_rmsnorm_kernel_matches_layer() -> None:
    torch.manual_seed(0)
    layer = RMSNorm(48, 1e-6).to(DEV)
    layer.weight.data.normal_(1.0, 0.1)
    x = torch.randn(5, 48, device=DEV)
    res = torch.randn(5, 48, device=DEV)
    ref_out, ref_res = layer(x, res.clone())
    res_k = res.clone()
    out = rmsnorm(x, layer.weight, 1e-6, residual=res_k)
    assert rel(out, ref_out) < 1e-6 and rel(res_k, ref_res) < 1e-6
    assert rel(rmsnorm(x, layer.weight, 1e-6), layer(x)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_rmsnorm_kernel_matches_embedding_then_norm(dtype: torch.dtype) -> None:
    """The feed (placeholder ids taken from the previous step's sampled ids), the embedding rows
    and the first norm in one launch, as the embedding and the rmsnorm kernel give them; and the
    staged decode inputs it moves into a graph's buffers."""
    torch.manual_seed(0)
    vocab, h = 50, 48
    emb = torch.randn(vocab, h, device=DEV).to(dtype)
    layer = RMSNorm(h, 1e-6).to(DEV)
    layer.weight.data.normal_(1.0, 0.1)
    w = layer.weight.data.to(dtype)
    ids = torch.tensor([3, -1, 7, -1, 49], device=DEV)  # -1: placeholders the feed fills
    rows = torch.tensor([-1, 2, -1, 0, -1], device=DEV)
    prev = torch.tensor([11, 12, 13], device=DEV)
    want = emb[[3, 13, 7, 11, 49]]
    res, x = embed_rmsnorm(ids, emb, w, 1e-6, feed=(rows, prev))
    assert torch.equal(res, want)
    assert torch.equal(x, rmsnorm(want, w, 1e-6))
    ref = layer.to(dtype)(want.cpu() if DEV == "cpu" else want)
    assert rel(x.float(), ref.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    # no feed: the ids as given; preallocated outputs; staged inputs moved (a slice of the packed
    # words per program, each row's first `width` block-table entries; both in chunks of 256)
    words = torch.arange(600, dtype=torch.int32, device=DEV)
    tables = torch.randint(0, 1000, (4, 310), dtype=torch.int32, device=DEV)
    # a packed source (rows at stride `width`, cuda_graphs.pack_tables) and fewer table rows than
    # tokens (a step with prefill chunks: a table per sequence), no words
    packed = tables.view(-1)[: 3 * 32].view(3, 32)
    for rows, width, src, tab_rows in ((3, 7, tables, None), (1, 300, tables, None), (3, 32, packed, 2)):
        out = (torch.zeros(rows, h, dtype=dtype, device=DEV), torch.zeros(rows, h, dtype=dtype, device=DEV))
        moved = words if tab_rows is None else words[:0]
        words_out = torch.zeros_like(moved)
        tables_out = torch.full((4, 312), -5, dtype=torch.int32, device=DEV)
        pick = [3, 7, 49][:rows]
        got = embed_rmsnorm(
            torch.tensor(pick, device=DEV), emb, w, 1e-6, out=out,
            staged=StagedInputs(moved, words_out, src, tables_out, width, tab_rows),
        )  # fmt: skip
        assert got[0] is out[0] and got[1] is out[1]
        assert torch.equal(out[0], emb[pick]) and torch.equal(out[1], rmsnorm(emb[pick], w, 1e-6))
        assert torch.equal(words_out, moved)
        copied = rows if tab_rows is None else tab_rows
        assert torch.equal(tables_out[:copied, :width], src[:copied, :width])
        # only what is in use
        assert (tables_out[:copied, width:] == -5).all() and (tables_out[copied:] == -5).all()


def test_silu_and_mul_kernel() -> None:
    x = torch.randn(3, 2 * 40, device=DEV)
    g, u = x.split(40, dim=-1)
    assert rel(silu_and_mul(x), torch.nn.functional.silu(g) * u) < 1e-6


def test_rope_and_cache_kernel_matches_rotary_and_write() -> None:
    torch.manual_seed(0)
    h, kvh, d, page = 4, 2, 16, 16
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32)
    rot = RotaryEmbedding(rope, d, 256).to(DEV)
    t = 6
    qkv = torch.randn(t, (h + 2 * kvh) * d, device=DEV)
    positions = torch.tensor([0, 1, 2, 100, 101, 255], device=DEV)
    slots = torch.tensor([3, 4, 5, 40, -1, 77], device=DEV)  # -1: padding, not written
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q_ref, k_ref = rot(positions, q.reshape(t, h, d), k.reshape(t, kvh, d))
    kc = torch.zeros(8, page, kvh, d, device=DEV)
    vc = torch.zeros(8, page, kvh, d, device=DEV)
    work = qkv.clone()
    rope_and_cache(work, positions, rot.cos, rot.sin, kc, vc, slots, h, kvh, d)
    assert rel(work[:, : h * d].reshape(t, h, d), q_ref) < 1e-6
    flat_k, flat_v = kc.view(-1, kvh, d), vc.view(-1, kvh, d)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert rel(flat_k[s], k_ref[i]) < 1e-6
        assert torch.equal(flat_v[s], v.reshape(t, kvh, d)[i])
    assert flat_k[41:77].abs().sum() == 0  # nothing written for the padding token


FP8_CASES = [CASES[0], CASES[1], CASES[4]]  # decodes, mixed prefill/decode, split-KV decode


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values stored [block, kv head, slot, channel], viewed [block, slot, kv head, channel]
    (alloc_kv_cache's layout)."""
    return cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


@pytest.mark.parametrize("layout", ["slot", "head"])
@pytest.mark.parametrize(("h", "kvh", "d", "page", "qlens", "ctx", "splits"), FP8_CASES)
def test_paged_attention_reads_an_fp8_cache(h, kvh, d, page, qlens, ctx, splits, layout) -> None:
    """kv_cache_dtype fp8: the kernel widens float8_e4m3fn K/V before its dots, over a cache stored
    slot-major or head-major (the engine's). Reference: the torch backend over the same fp8 cache
    converted up to float32 (exact)."""
    torch.manual_seed(0)
    nb = 64
    meta = make_batch(qlens, ctx, page, nb, seed=1)
    t = sum(qlens)
    k_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV).to(KV_FP8_DTYPE)
    v_cache = torch.randn(nb, page, kvh, d, dtype=DT, device=DEV).to(KV_FP8_DTYPE)
    if layout == "head":
        k_cache, v_cache = head_major(k_cache), head_major(v_cache)
    q = torch.randn(t, h, d, dtype=DT, device=DEV)
    k = torch.randn(t, kvh, d, dtype=DT, device=DEV)
    v = torch.randn(t, kvh, d, dtype=DT, device=DEV)
    scale = d**-0.5
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)  # the new tokens, clamped and cast
    kc_up, vc_up = k_cache.to(DT).contiguous(), v_cache.to(DT).contiguous()
    slots = meta.slot_mapping
    k_up, v_up = kc_up.view(-1, kvh, d)[slots], vc_up.view(-1, kvh, d)[slots]
    ref = TorchAttentionBackend().attend(q, k_up, v_up, kc_up.clone(), vc_up.clone(), meta, scale)
    out = run_paged_attention(q, k_cache, v_cache, meta, scale, splits)
    assert rel(out, ref) < 1e-5
    # the torch backend's own fp8 read path (gather, widen to q's dtype) gives the same result
    torch_out = TorchAttentionBackend().attend(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale)
    assert rel(torch_out, ref) < 1e-6
    # a bf16 model: the kernel runs its dots in fp16 over the fp8 cache (e4m3 -> f16 is exact; q and
    # the probabilities round to fp16's 11 bits, finer than bf16's 8)
    q16 = q.to(torch.bfloat16)
    ref16 = TorchAttentionBackend().attend(q16.float(), k_up, v_up, kc_up.clone(), vc_up.clone(), meta, scale)
    out16 = run_paged_attention(q16, k_cache, v_cache, meta, scale, splits)
    assert out16.dtype == torch.bfloat16
    assert rel(out16, ref16) < 4e-3


@pytest.mark.skipif(DEV != "cuda", reason="the word-wise widening is PTX (sm_89+); the interpreter runs none")
@pytest.mark.parametrize(
    ("h", "kvh", "d", "page", "qlens", "ctx", "splits"),
    [*FP8_CASES, (32, 8, 128, 16, [1] * 6, [5, 130, 257, 1000, 16, 2000], 1)],
)
@pytest.mark.parametrize("act", [DT, torch.bfloat16])
def test_fp8_cache_v_widened_as_words_equals_the_plain_load(h, kvh, d, page, qlens, ctx, splits, act) -> None:
    """An e4m3 cache's V read as int32 words and widened by cvt.rn.f16x2.e4m3x2 in the load's layout
    (the default on sm_89+) gives the same outputs, bit for bit, as the plain fp8 load that Triton
    converts in the dot's operand layout (tuning fp8_widen_v off)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("cvt.rn.f16x2.e4m3x2 needs sm_89")
    torch.manual_seed(0)
    nb = sum(-(-c // page) for c in ctx) + 8
    meta = make_batch(qlens, ctx, page, nb, seed=1)
    k_cache = head_major(torch.randn(nb, page, kvh, d, device=DEV).mul(3).to(KV_FP8_DTYPE))
    v_cache = head_major(torch.randn(nb, page, kvh, d, device=DEV).mul(3).to(KV_FP8_DTYPE))
    q = torch.randn(sum(qlens), h, d, device=DEV).to(act)
    words = run_paged_attention(q, k_cache, v_cache, meta, d**-0.5, splits)
    plain = run_paged_attention(q, k_cache, v_cache, meta, d**-0.5, splits, tuning={"fp8_widen_v": False})
    assert torch.equal(words, plain), (words.float() - plain.float()).abs().max().item()


def e4m3_step(x: torch.Tensor) -> torch.Tensor:
    """The e4m3 spacing at |x|: 2^(e - 3) in binade 2^e, 2^-9 among the subnormals (e < -6)."""
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0**-9))).clamp(min=-6)
    return torch.exp2(e - 3)


def assert_e4m3_close(got: torch.Tensor, want: torch.Tensor, what: str, one_step: bool) -> None:
    """got == want (float8_e4m3fn codes, compared as float32), with two allowances:

    - `one_step` (K): one e4m3 step where exact equality fails: the kernel rotates K in its own
      float32 expression, which may round the last bit apart from the torch rotary (rel ~1e-7),
      and a value that close to a midpoint between two codes then rounds to the other one;
    - under Triton's interpreter only, whose float32 -> e4m3 cast is not the hardware's: it loses
      the carry when rounding up into the next binade (1.97 becomes 1, not 2; the same quirk
      quant_cases.py documents for the per-token FP8 kernel): exactly those codes (got is want / 2,
      want a power of two) are accepted; and it rounds some subnormals (|x| < 2^-6) one step
      apart from torch's round-to-nearest-even (seen: -0.0039 where torch gives -0.0059), so
      there every code gets the one-step tolerance. On a GPU, V (only cast, never rotated) must
      be exact.
    """
    got, want = got.float().cpu(), want.float().cpu()
    if os.environ.get("TRITON_INTERPRET") == "1":
        carry = (got != want) & (got * 2 == want) & (torch.frexp(want)[0].abs() == 0.5)
        got = torch.where(carry, want, got)
        one_step = True
    assert not got.isnan().any(), what
    off = (got - want).abs()
    if not one_step:
        assert torch.equal(got, want), f"{what}: {int((off > 0).sum())} codes differ"
        return
    step = e4m3_step(torch.maximum(got.abs(), want.abs()))
    assert bool((off <= step).all()), f"{what}: {int((off > step).sum())} codes more than one e4m3 step off"
    exact = float((off == 0).float().mean())
    assert exact > 0.97, f"{what}: only {exact:.1%} of the codes are exact"


def test_rope_and_cache_writes_an_fp8_cache() -> None:
    """Rotated K and plain V are clamped to +-448 and cast to float8_e4m3fn (round to nearest even);
    an outlier saturates at 448 instead of becoming NaN or wrapping (Triton's interpreter turns an
    unclamped 1000.0 into 256.0 and 470.0 into NaN)."""
    torch.manual_seed(0)
    h, kvh, d, page = 4, 2, 16, 16
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32)
    rot = RotaryEmbedding(rope, d, 256).to(DEV)
    t = 6
    qkv = torch.randn(t, (h + 2 * kvh) * d, device=DEV) * 4
    k_off, v_off = h * d, (h + kvh) * d
    qkv[0, k_off] = 1000.0  # position 0: rotation leaves the first half alone, so K stays 1000
    qkv[1, v_off + 3] = 1000.0
    qkv[2, v_off + d + 5] = -1000.0
    qkv[3, v_off + 7] = 470.0  # rounds past 448 unless clamped first
    positions = torch.tensor([0, 1, 2, 100, 101, 255], device=DEV)
    slots = torch.tensor([3, 4, 5, 40, -1, 77], device=DEV)  # -1: padding, not written
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q_ref, k_ref = rot(positions, q.reshape(t, h, d), k.reshape(t, kvh, d))
    v_ref = v.reshape(t, kvh, d)
    kc, vc = alloc_kv_cache(8, page, kvh, d, KV_FP8_DTYPE, torch.device(DEV))
    assert kc.stride(2) == page * d  # head-major storage: the kernel writes through the strides
    work = qkv.clone()
    rope_and_cache(work, positions, rot.cos, rot.sin, kc, vc, slots, h, kvh, d)
    assert rel(work[:, : h * d].reshape(t, h, d), q_ref) < 1e-6  # q is rotated in place as before
    flat_k, flat_v = kc.reshape(-1, kvh, d), vc.reshape(-1, kvh, d)
    written = [(i, s) for i, s in enumerate(slots.tolist()) if s >= 0]
    rows = torch.tensor([i for i, _ in written])
    at = torch.tensor([s for _, s in written])
    got_k, got_v = flat_k[at.to(DEV)], flat_v[at.to(DEV)]
    want_k = k_ref[rows.to(DEV)].clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8_DTYPE)
    want_v = v_ref[rows.to(DEV)].clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8_DTYPE)
    assert float(got_k[0, 0, 0].float()) == KV_FP8_MAX  # the K outlier saturated
    assert float(got_v[1, 0, 3].float()) == KV_FP8_MAX
    assert float(got_v[2, 1, 5].float()) == -KV_FP8_MAX
    assert float(got_v[3, 0, 7].float()) == KV_FP8_MAX
    assert_e4m3_close(got_k, want_k, "K", one_step=True)
    assert_e4m3_close(got_v, want_v, "V", one_step=False)  # only cast: exact on hardware
    assert flat_k[41:77].float().abs().sum() == 0  # nothing written for the padding token
    assert flat_v[41:77].float().abs().sum() == 0


BF16 = torch.bfloat16
ON_CUDA = pytest.mark.skipif(DEV != "cuda", reason="bf16 dots: Triton's interpreter gets them wrong")
FUSED_CASES = [
    # (heads, kv heads, head dim, page, context lens (0: a graph's padding row), splits, cache dtype,
    # activation dtype); contexts stay below the test's 256 rotary positions
    (4, 2, 16, 16, [1, 17, 40], 1, DT, DT),
    (8, 2, 32, 16, [100, 7, 0], 4, DT, DT),  # split-KV; the new key's split is not the first
    (4, 2, 16, 16, [1, 3, 65, 0], 8, DT, DT),  # more splits than tiles; a one-token context
    (4, 1, 16, 8, [33, 64, 5], 2, DT, DT),  # GQA 4, page 8; the new token opens a page (33)
    (4, 2, 16, 16, [200, 130, 1, 0], 1, DT, DT),  # several key tiles after the early one
    (4, 2, 16, 16, [200, 130, 1, 0], 2, DT, DT),
    (8, 2, 32, 16, [100, 7, 0], 4, KV_FP8_DTYPE, DT),
    (4, 2, 16, 16, [1, 17, 40], 1, KV_FP8_DTYPE, DT),
    (8, 2, 32, 16, [250, 129, 0], 1, KV_FP8_DTYPE, DT),  # two 128-key fp8 tiles
    pytest.param(8, 2, 32, 16, [200, 33, 0], 2, BF16, BF16, marks=ON_CUDA),  # the engine's bf16 path
    pytest.param(8, 2, 32, 16, [250, 17, 0], 2, KV_FP8_DTYPE, BF16, marks=ON_CUDA),  # fp16 dots (Q_F16)
]


@pytest.mark.parametrize(("h", "kvh", "d", "page", "ctx", "splits", "cache_dtype", "act"), FUSED_CASES)
def test_fused_decode_matches_rope_then_attention(h, kvh, d, page, ctx, splits, cache_dtype, act) -> None:
    """A decode step through paged_attention(new_kv=...) (rotary, cache write and attention in one
    kernel) against rope_and_cache followed by paged_attention: the same cache afterwards and the
    same output; q is left unrotated; padding rows (context 0, slot -1) write nothing and give 0."""
    torch.manual_seed(0)
    nb = 64
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32)
    rot = RotaryEmbedding(rope, d, 256).to(DEV)
    live = [c for c in ctx if c > 0]
    meta = make_batch([1] * len(live), live, page, nb, seed=2)
    b = len(ctx)
    pad = b - len(live)  # padding rows as DecodeGraphs fills them: qlen 1, context 0, slot -1
    meta.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=DEV)
    meta.seq_lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((pad,), -1, device=DEV)])
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:pad])])
    positions = torch.tensor([max(c - 1, 0) for c in ctx], device=DEV)
    scale = d**-0.5
    kc, vc = alloc_kv_cache(nb, page, kvh, d, cache_dtype, torch.device(DEV))
    kc.copy_(torch.randn(nb, page, kvh, d, device=DEV).to(cache_dtype))
    vc.copy_(torch.randn(nb, page, kvh, d, device=DEV).to(cache_dtype))
    qkv = (torch.randn(b, (h + 2 * kvh) * d, device=DEV) * 2).to(act)

    work, kc_ref, vc_ref = qkv.clone(), kc.clone(), vc.clone()
    rope_and_cache(work, positions, rot.cos, rot.sin, kc_ref, vc_ref, meta.slot_mapping, h, kvh, d)
    q_rot = work[:, : h * d].view(b, h, d)
    want = run_paged_attention(q_rot, kc_ref, vc_ref, meta, scale, splits)

    fused = qkv.clone()
    q = fused[:, : h * d].view(b, h, d)
    k = fused[:, h * d : (h + kvh) * d].view(b, kvh, d)
    v = fused[:, (h + kvh) * d :].view(b, kvh, d)
    out = torch.full_like(q_rot, float("nan"))
    new_kv = NewKV(k, v, positions, rot.cos, rot.sin, meta.slot_mapping)
    paged_attention(
        q, kc, vc, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, 1, scale,
        num_splits=splits, new_kv=new_kv,
    )  # fmt: skip
    assert torch.equal(fused, qkv)  # nothing rotated in place
    assert not out.isnan().any()
    assert rel(out.float(), want.float()) < (
        1e-5 if cache_dtype == act == DT else 1e-3 if act == DT else 1e-2
    )
    assert out[len(live) :].abs().sum() == 0  # padding rows
    # the caches: equal everywhere but the new slots, where K was rotated by another float32
    # expression (last-bit differences; one e4m3 step at most in an fp8 cache); V is only cast
    slots = meta.slot_mapping[: len(live)]
    flat = [c.reshape(-1, kvh, d) for c in (kc, vc, kc_ref, vc_ref)]
    untouched = torch.ones(flat[0].shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(flat[0][untouched].float(), flat[2][untouched].float())
    assert torch.equal(flat[1][untouched].float(), flat[3][untouched].float())
    if cache_dtype == DT:
        assert rel(flat[0][slots], flat[2][slots]) < 1e-6
        assert torch.equal(flat[1][slots], flat[3][slots])
    elif cache_dtype == BF16:  # one bf16 step at most
        got, want_k = flat[0][slots].float(), flat[2][slots].float()
        assert bool(((got - want_k).abs() <= want_k.abs() * 2.0**-7).all())
        assert torch.equal(flat[1][slots], flat[3][slots])
    else:
        assert_e4m3_close(flat[0][slots], flat[2][slots], "K", one_step=True)
        assert_e4m3_close(flat[1][slots], flat[3][slots], "V", one_step=False)


KV_SCALE = (3.0, 5.0)  # a checkpoint's (k_scale, v_scale): the cache holds K / 3 and V / 5


@pytest.mark.parametrize(("h", "kvh", "d", "page", "qlens", "ctx", "splits"), FP8_CASES)
def test_paged_attention_applies_fp8_cache_scales(h, kvh, d, page, qlens, ctx, splits) -> None:
    """An fp8 cache with per-layer scales (K and V up to ~+-1,300, beyond e4m3's 448 unscaled): the
    new tokens are written divided by the scales (layers/attention.to_fp8_cache), and the kernel's
    output equals the torch backend's over the same cache with the same scales; without the scales
    the same cache gives a different output."""
    torch.manual_seed(0)
    nb = 64
    meta = make_batch(qlens, ctx, page, nb, seed=1)
    t = sum(qlens)
    kc, vc = alloc_kv_cache(nb, page, kvh, d, KV_FP8_DTYPE, torch.device(DEV))
    kc.copy_(torch.randn(nb, page, kvh, d, device=DEV).mul(100).clamp(-400, 400).to(KV_FP8_DTYPE))
    vc.copy_(torch.randn(nb, page, kvh, d, device=DEV).mul(100).clamp(-400, 400).to(KV_FP8_DTYPE))
    q = torch.randn(t, h, d, dtype=DT, device=DEV) / 100
    k = torch.randn(t, kvh, d, dtype=DT, device=DEV) * 300
    v = torch.randn(t, kvh, d, dtype=DT, device=DEV) * 300
    scale = d**-0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = TorchAttentionBackend().attend(q, k, v, kc_ref, vc_ref, meta, scale, KV_SCALE)
    slots = meta.slot_mapping
    flat_k, flat_v = kc_ref.reshape(-1, kvh, d), vc_ref.reshape(-1, kvh, d)
    assert torch.equal(flat_k[slots].float(), to_fp8_cache(k, KV_SCALE[0]).float())
    assert torch.equal(flat_v[slots].float(), to_fp8_cache(v, KV_SCALE[1]).float())
    assert float(flat_v[slots].float().abs().max()) > 100  # the stored values use e4m3's range
    out = torch.full_like(q, float("nan"))
    paged_attention(
        q, kc_ref, vc_ref, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, scale, num_splits=splits, kv_scale=KV_SCALE,
    )  # fmt: skip
    assert rel(out, ref) < 1e-5
    unscaled = run_paged_attention(q, kc_ref, vc_ref, meta, scale, splits)
    assert rel(unscaled, ref) > 0.1
    # a bf16 model (the engine's path): fp16 dots over the scaled fp8 cache
    q16 = q.to(torch.bfloat16)
    kc_up, vc_up = kc_ref.float() * KV_SCALE[0], vc_ref.float() * KV_SCALE[1]
    k_up, v_up = kc_up.reshape(-1, kvh, d)[slots], vc_up.reshape(-1, kvh, d)[slots]
    ref16 = TorchAttentionBackend().attend(q16.float(), k_up, v_up, kc_up.clone(), vc_up.clone(), meta, scale)
    out16 = torch.full_like(q16, float("nan"))
    paged_attention(
        q16, kc_ref, vc_ref, out16, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, scale, num_splits=splits, kv_scale=KV_SCALE,
    )  # fmt: skip
    assert rel(out16.float(), ref16) < 4e-3


@pytest.mark.parametrize("act", [DT, pytest.param(BF16, marks=ON_CUDA)])
def test_rope_and_cache_and_fused_decode_apply_fp8_cache_scales(act: torch.dtype) -> None:
    """rope_and_cache and the fused decode kernel (paged_attention(new_kv=...)) store the rotated K
    and V divided by the cache's scales: the codes of to_fp8_cache (one e4m3 step for K, whose
    rotation the two compute in different float32 expressions), and the same attention output; in
    bf16 too (the engine's path: fp16 dots over the fp8 cache)."""
    torch.manual_seed(0)
    h, kvh, d, page, nb = 8, 2, 32, 16, 64
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32)
    rot = RotaryEmbedding(rope, d, 256).to(DEV)
    ctx = [100, 7, 40]
    meta = make_batch([1] * len(ctx), ctx, page, nb, seed=2)
    positions = torch.tensor([c - 1 for c in ctx], device=DEV)
    scale = d**-0.5
    kc, vc = alloc_kv_cache(nb, page, kvh, d, KV_FP8_DTYPE, torch.device(DEV))
    kc.copy_(torch.randn(nb, page, kvh, d, device=DEV).mul(100).clamp(-400, 400).to(KV_FP8_DTYPE))
    vc.copy_(torch.randn(nb, page, kvh, d, device=DEV).mul(100).clamp(-400, 400).to(KV_FP8_DTYPE))
    qkv = (torch.randn(len(ctx), (h + 2 * kvh) * d, device=DEV) * 300).to(act)
    q_ref, k_ref = rot(
        positions, qkv[:, : h * d].reshape(-1, h, d), qkv[:, h * d : (h + kvh) * d].reshape(-1, kvh, d)
    )
    v_ref = qkv[:, (h + kvh) * d :].reshape(-1, kvh, d)

    work, kc_ref, vc_ref = qkv.clone(), kc.clone(), vc.clone()
    rope_and_cache(
        work, positions, rot.cos, rot.sin, kc_ref, vc_ref, meta.slot_mapping, h, kvh, d, kv_scale=KV_SCALE
    )
    slots = meta.slot_mapping
    got_k, got_v = kc_ref.reshape(-1, kvh, d)[slots], vc_ref.reshape(-1, kvh, d)[slots]
    if act == DT:
        assert_e4m3_close(got_k, to_fp8_cache(k_ref, KV_SCALE[0]), "K", one_step=True)
    # (bf16: the kernel rotates the bf16 inputs in float32, torch's rotary rounds to bf16 first, so
    # K's codes part more often than assert_e4m3_close allows; times the scale they are still K)
    assert rel(got_k.float() * KV_SCALE[0], k_ref.float()) < 0.15  # e4m3 steps, a few saturated
    assert_e4m3_close(got_v, to_fp8_cache(v_ref, KV_SCALE[1]), "V", one_step=False)
    want = torch.full_like(q_ref, float("nan"))
    paged_attention(
        work[:, : h * d].view(-1, h, d), kc_ref, vc_ref, want, meta.query_start_loc, meta.seq_lens,
        meta.block_tables, 1, scale, num_splits=2, kv_scale=KV_SCALE,
    )  # fmt: skip

    fused = qkv.clone()
    out = torch.full_like(q_ref, float("nan"))
    new_kv = NewKV(
        fused[:, h * d : (h + kvh) * d].view(-1, kvh, d), fused[:, (h + kvh) * d :].view(-1, kvh, d),
        positions, rot.cos, rot.sin, meta.slot_mapping,
    )  # fmt: skip
    paged_attention(
        fused[:, : h * d].view(-1, h, d), kc, vc, out, meta.query_start_loc, meta.seq_lens,
        meta.block_tables, 1, scale, num_splits=2, new_kv=new_kv, kv_scale=KV_SCALE,
    )  # fmt: skip
    assert_e4m3_close(kc.reshape(-1, kvh, d)[slots], got_k, "K", one_step=True)
    assert_e4m3_close(vc.reshape(-1, kvh, d)[slots], got_v, "V", one_step=False)
    assert rel(out.float(), want.float()) < (1e-3 if act == DT else 1e-2)


@pytest.mark.parametrize(("v", "block"), [(1000, 256), (1000, 1024), (4096, 512), (37, 64)])
def test_argmax_rows_kernel_matches_torch(v: int, block: int) -> None:
    """One program per row, lanes over chunks of `block` (or a row split over programs): ties
    (across lanes, chunks, splits and inside one lane), whole-row ties, NaN (the first one wins, as torch.argmax has it), +-inf rows, and
    rows shorter than one chunk (v = 37)."""
    g = torch.Generator().manual_seed(v)
    x = torch.randn(10, v, generator=g)
    x[1, v - 1] = x[1, 3] = 9.0  # tie across chunks: the first index wins
    x[2, 5] = x[2, 5 + min(block, v - 6)] = 9.0  # the same lane in two chunks (or a late lane)
    x[3] = 1.5  # the whole row tied
    x[4, v // 2] = float("nan")
    x[4, v // 3] = float("nan")  # two NaN: the first
    x[4, 0] = float("inf")
    x[5, -1] = float("inf")
    x[6] = float("-inf")  # every value -inf: index 0
    x[7, :] = float("-inf")
    x[7, v - 2] = -1e30
    x[8, 0] = float("nan")  # NaN at the very first element
    x[9, 1::2] = 7.0  # many lanes tie, the first at index 1
    want = x.argmax(dim=-1)
    # one program per row, and each row split over 2 or 16 programs (their chunks of 64 columns and
    # up; v = 37 leaves 15 of 16 splits empty); twice each (the tickets reset)
    for splits in (1, 2, 16, 16):
        got = argmax_rows(x.to(DEV), block=block, num_warps=4, splits=splits)
        assert got.dtype == torch.int64
        assert got.tolist() == want.tolist(), splits
        assert got.tolist()[1:10] == [3, 5, 0, v // 3, v - 1, 0, v - 2, 0, 1]


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's chi-square of draws against probabilities, below the 99.9th percentile of its
    distribution (Wilson-Hilferty); cells expected fewer than 5 times are pooled into one, and that
    one into the smallest other cell if it is still under 5."""
    n = int(counts.sum())
    small = probs * n < 5
    c = counts[~small].tolist() + [float(counts[small].sum())]
    e = (probs[~small] * n).tolist() + [float(probs[small].sum()) * n]
    if e[-1] < 5:
        i = min(range(len(e) - 1), key=lambda j: e[j])
        c[i], e[i] = c[i] + c[-1], e[i] + e[-1]
        c, e = c[:-1], e[:-1]
    chi2 = sum((ci - ei) ** 2 / ei for ci, ei in zip(c, e))
    k = len(e) - 1  # degrees of freedom
    z = 3.09  # the normal 99.9th percentile
    limit = k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3
    return chi2 < limit


@pytest.mark.parametrize(("v", "block", "temp"), [(12, 64, 1.0), (300, 128, 0.5), (37, 32, 2.0)])
def test_sample_rows_kernel_draws_softmax(v: int, block: int, temp: float) -> None:
    """Many rows with the same logits and distinct seeds are draws from softmax(logits / T): the
    token counts pass a chi-square test; banned (-inf) tokens never come up; only the listed rows
    are written; the same seeds give the same tokens whatever the launch holds."""
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(v, generator=g) * 2.0
    logits[3] = float("-inf")
    n = 250
    x = logits.repeat(n + 2, 1).to(DEV)
    rows = torch.arange(1, n + 1, dtype=torch.int64)  # rows 0 and n + 1 are left alone
    seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)
    temps = torch.full((n,), temp)
    out = torch.full((n + 2,), -7, dtype=torch.int64, device=DEV)
    sample_rows(x, rows.to(DEV), temps.to(DEV), seeds.to(DEV), out, block=block, num_warps=4)
    got = out.cpu()
    assert got[0] == -7 and got[-1] == -7
    drawn = got[1:-1]
    assert bool(((drawn >= 0) & (drawn < v)).all()) and not bool((drawn == 3).any())
    probs = torch.softmax(logits.double() / temp, dim=0)
    assert _chi2_ok(torch.bincount(drawn, minlength=v).double(), probs)
    # a reordered subset of the rows with their seeds: the same tokens
    pick = torch.tensor([5, 0, 17, 9])
    out2 = torch.full((n + 2,), -7, dtype=torch.int64, device=DEV)
    sample_rows(x, rows[pick].to(DEV), temps[pick].to(DEV), seeds[pick].to(DEV), out2, block=block)
    assert out2.cpu()[rows[pick]].tolist() == got[rows[pick]].tolist()


def test_sample_rows_kernel_independent_noise_per_column() -> None:
    """Four equal logits at the same offset in two quarters of one chunk and in two later chunks
    are drawn 1 / 4 each: noise reused across quarters or chunks would always hand the tie to the
    earliest column."""
    v, block, q = 200, 64, 16
    cols = [5, 5 + q, 5 + block, 5 + 2 * block]
    logits = torch.full((v,), -30.0)
    logits[cols] = 0.0
    n = 250
    x = logits.repeat(n, 1).to(DEV)
    g = torch.Generator().manual_seed(9)
    seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64).to(DEV)
    out = torch.empty(n, dtype=torch.int64, device=DEV)
    rows = torch.arange(n, dtype=torch.int64, device=DEV)
    sample_rows(x, rows, torch.ones(n, device=DEV), seeds, out, block=block, num_warps=4)
    drawn = out.cpu()
    assert set(drawn.tolist()) <= set(cols)
    counts = torch.tensor([float((drawn == c).sum()) for c in cols], dtype=torch.float64)
    assert _chi2_ok(counts, torch.full((4,), 0.25, dtype=torch.float64))


def test_sample_rows_kernel_low_temperature_and_tail() -> None:
    """A near-zero temperature gives the argmax, including a maximum in the last, partial chunk;
    NaN logits are never drawn, and a row of -inf (every token banned) still yields a valid id."""
    v = 1000
    x = torch.randn(5, v, generator=torch.Generator().manual_seed(1))
    x[0, v - 1] = 8.0
    x[1, 0] = 8.0
    x[2, 517] = 8.0
    x[3, :900] = float("nan")  # every lane starts on NaN
    x[3, 950] = 8.0
    x[4] = float("-inf")
    out = torch.empty(5, dtype=torch.int64, device=DEV)
    rows = torch.arange(5, dtype=torch.int64, device=DEV)
    seeds = torch.tensor([1, 2, 3, 4, 5], dtype=torch.int64, device=DEV)
    sample_rows(x.to(DEV), rows, torch.full((5,), 1e-3, device=DEV), seeds, out, block=256)
    assert out.tolist()[:4] == [v - 1, 0, 517, 950]
    assert 0 <= out.tolist()[4] < v


@pytest.mark.parametrize("splits", [2, 16])
def test_sample_rows_kernel_split_rows_draw_the_same_tokens(splits: int) -> None:
    """A row split over several programs (spans of whole chunks, the last program reducing the
    partials) draws exactly the tokens of one program per row, from float32 logits and from 16-bit
    ones (read as they are) alike; spans past the row's end (16 splits of 4 chunks) change nothing,
    nor do NaN, -inf rows and a maximum in the last partial chunk; tickets are left at zero, and
    the argmax's ticket buffer, which one-row decode graphs capture, is not replaced by a draw of
    more rows than it holds."""
    from inferfleet.worker.kernels import elementwise

    v, block = 1000, 256
    argmax_rows(torch.zeros(2, 64, device=DEV), splits=2)  # a split argmax: takes its tickets
    argmax_tickets = elementwise._ARGMAX_TICKETS[torch.zeros(1, device=DEV).device]
    g = torch.Generator().manual_seed(splits)
    x = torch.randn(16, v, generator=g) * 2
    x[0, v - 1] = 30.0
    x[1, :900] = float("nan")
    x[2] = float("-inf")
    rows = torch.randperm(16, generator=g)[:12].to(DEV)
    seeds = torch.randint(0, 2**62, (12,), generator=g, dtype=torch.int64).to(DEV)
    temps = (torch.rand(12, generator=g) + 0.3).to(DEV)
    for logits in (x.to(DEV), x.to(DEV, torch.bfloat16)):
        one = torch.full((16,), -7, dtype=torch.int64, device=DEV)
        sample_rows(logits, rows, temps, seeds, one, block=block, num_warps=4, splits=1)
        split = torch.full((16,), -7, dtype=torch.int64, device=DEV)
        sample_rows(logits, rows, temps, seeds, split, block=block, num_warps=4, splits=splits)
        assert split.tolist() == one.tolist()
        assert bool(((one[rows] >= 0) & (one[rows] < v)).all())
        if logits.dtype != torch.float32:  # 16-bit logits draw what their widening draws
            wide = torch.full((16,), -7, dtype=torch.int64, device=DEV)
            sample_rows(logits.float(), rows, temps, seeds, wide, block=block, num_warps=4, splits=splits)
            assert one.tolist() == wide.tolist()
    assert elementwise._ARGMAX_TICKETS[rows.device] is argmax_tickets
    assert int(elementwise._SAMPLE_TICKETS[rows.device].abs().sum()) == 0


@pytest.mark.skipif(DEV != "cuda", reason="lg2.approx is PTX; the interpreter runs the tl.log form")
def test_sample_rows_fast_log_draws_what_logf_draws() -> None:
    """The noise through lg2.approx (and its series near u = 1) is logf's within ~1e-5: from the same
    seeds the two forms draw the same token in all but near-tied rows, over flat logits where the
    noise alone decides and over peaked ones where its large draws (u near 1) decide."""
    g = torch.Generator().manual_seed(11)
    for scale in (0.01, 3.0):
        x = (torch.randn(4000, 1000, generator=g) * scale).to(DEV)
        rows = torch.arange(4000, device=DEV)
        seeds = torch.randint(0, 2**62, (4000,), generator=g, dtype=torch.int64).to(DEV)
        temps = torch.full((4000,), 0.7, device=DEV)
        fast = torch.empty(4000, dtype=torch.int64, device=DEV)
        exact = torch.empty(4000, dtype=torch.int64, device=DEV)
        sample_rows(x, rows, temps, seeds, fast, block=256, num_warps=4, fast_log=True)
        sample_rows(x, rows, temps, seeds, exact, block=256, num_warps=4, fast_log=False)
        assert float((fast == exact).float().mean()) > 0.999


@pytest.mark.skipif(DEV != "cuda", reason="the default split is sized by the GPU's SM count")
def test_sample_rows_default_split_fills_the_gpu() -> None:
    """The default launch splits ~140 rows of a Llama-3 vocabulary (128,256) over several programs
    each, one row over at most its number of chunks, and draws what one program per row draws."""
    from inferfleet.worker.kernels.elementwise import sample_splits

    assert sample_splits(137, 128_256, 8192, torch.device(DEV)) > 1
    assert sample_splits(1, 128_256, 8192, torch.device(DEV)) == 16
    assert sample_splits(1, 1000, 256, torch.device(DEV)) == 4
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(137, 128_256, generator=g) * 3).to(DEV, torch.bfloat16)
    rows = torch.arange(137, device=DEV)
    seeds = torch.randint(0, 2**62, (137,), generator=g, dtype=torch.int64).to(DEV)
    temps = torch.full((137,), 0.6, device=DEV)
    a = torch.empty(137, dtype=torch.int64, device=DEV)
    b = torch.empty(137, dtype=torch.int64, device=DEV)
    sample_rows(x, rows, temps, seeds, a)
    sample_rows(x, rows, temps, seeds, b, splits=1)
    assert a.tolist() == b.tolist()


def test_rmsnorm_kernel_per_head_in_place() -> None:
    torch.manual_seed(0)
    t, h, d = 3, 4, 16
    layer = RMSNorm(d, 1e-6).to(DEV)
    layer.weight.data.normal_(1.0, 0.1)
    qkv = torch.randn(t, (h + 4) * d, device=DEV)
    q = qkv[:, : h * d].view(t, h, d)
    ref = layer(q.clone())
    untouched = qkv[:, h * d :].clone()
    rmsnorm(q, layer.weight, 1e-6, out=q)
    assert rel(qkv[:, : h * d].view(t, h, d), ref) < 1e-6
    assert torch.equal(qkv[:, h * d :], untouched)


@pytest.mark.parametrize(
    ("m", "n", "k", "bias"),
    [
        (1, 40, 64, False),
        (1, 19, 300, True),
        (3, 17, 300, True),
        (16, 64, 256, False),
        (33, 50, 96, True),
        (64, 16, 512, False),
        # whole tiles (no column masks; one row loads x as a broadcast tile): K = 4 and 2 one-row
        # tiles of 512 on CUDA (32 and 16 of 64 on the CPU); a prefetch past K is cut to K's tiles
        # there (gemv), and (1, 19, 300) takes the masked loads with prefetched tiles past K
        (1, 24, 2048, True),
        (1, 40, 1024, False),
    ],
)
def test_gemv_matches_linear(m: int, n: int, k: int, bias: bool) -> None:
    from inferfleet.worker.kernels.gemv import gemv

    torch.manual_seed(0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(m, k, device=DEV, dtype=dt)
    w = torch.randn(n, k, device=DEV, dtype=dt)
    b = torch.randn(n, device=DEV, dtype=dt) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
    tol = 1e-2 if dt == torch.bfloat16 else 1e-5
    got = gemv(x, w, bias=b, block_k=64 if DEV == "cpu" else None)
    assert rel(got.float(), ref) < tol
    if (
        m == 1
    ):  # the one-row path (CUDA-core FMAs, PDL where the engine turned it on) and the tensor-core path
        # prefetch: weight tiles loaded before the PDL wait, past K too (k=64: one tile of 64 on CPU)
        variants = ({"fma": False}, {"use_pdl": DEV == "cuda"}, {"prefetch": 0}, {"prefetch": 2},
                    {"prefetch": 3, "use_pdl": DEV == "cuda"}, {"prefetch": 3, "fma": False},
                    {"prefetch": 4, "use_pdl": DEV == "cuda"})  # fmt: skip
        for kw in variants:
            got = gemv(x, w, bias=b, block_k=64 if DEV == "cpu" else None, **kw)
            assert rel(got.float(), ref) < tol, kw
        # float32 out (logits): the 16-bit result, widened, from the same launch
        plain = gemv(x, w, bias=b, block_k=64 if DEV == "cpu" else None)
        wide = gemv(x, w, bias=b, block_k=64 if DEV == "cpu" else None, out_dtype=torch.float32)
        assert wide.dtype == torch.float32 and torch.equal(wide, plain.float())


def test_gemv_argmax_epilogue_is_torch_argmax_of_its_output() -> None:
    """gemv(argmax_best=) then argmax_finish: the first maximum of the launch's (float32) output as
    torch.argmax gives it, across programs: a tie over three programs (the first index wins), NaN
    (the first NaN wins), every output negative, and a partial last program; the best key is back
    at its minimum after each launch (four runs)."""
    from inferfleet.worker.kernels.elementwise import ARGMAX_KEY_MIN, argmax_finish
    from inferfleet.worker.kernels.gemv import gemv

    torch.manual_seed(2)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    n, k = 301, 64
    x = torch.randn(1, k, device=DEV, dtype=dt)
    w = torch.randn(n, k, device=DEV, dtype=dt)
    tied = w.clone()
    tied[5] = tied[17] = tied[250] = 4 * x[0].sign()  # the largest output, three times
    nan = w.clone()
    nan[123, 3] = float("nan")
    nan[200, 0] = float("nan")
    neg = -x[0].sign().expand(n, k) * torch.rand(n, 1, device=DEV, dtype=dt)  # every output < 0
    best = torch.full((1,), ARGMAX_KEY_MIN, dtype=torch.int64, device=DEV)
    tok = torch.empty(1, dtype=torch.int64, device=DEV)
    for xx, ww, want in ((x, tied, 5), (x, nan, 123), (x, neg.contiguous(), None), (x, w, None)):
        y = gemv(xx, ww, out_dtype=torch.float32, argmax_best=best, block_k=64 if DEV == "cpu" else None)
        argmax_finish(best, tok)
        assert int(tok) == int(y[0].argmax()), want
        if want is not None:
            assert int(tok) == want
        assert int(best) == ARGMAX_KEY_MIN


@pytest.mark.parametrize(
    ("n", "k", "bias", "block_n"),
    [(40, 64, False, None), (19, 300, True, None), (256, 128, True, 16), (48, 2048, False, None)],
)
def test_gemv_add_norm_matches_projection_then_norm(n: int, k: int, bias: bool, block_n: int | None) -> None:
    """gemv(add_norm=) is the projection then RMSNorm(y, residual): the residual gets y added in
    place, the result is the normalized sum, and the ticket counter is back at zero for the next
    launch (run twice: a counter left behind would make no program the last one)."""
    from inferfleet.worker.kernels.gemv import AddNorm, gemv

    torch.manual_seed(1)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    norm = RMSNorm(n, 1e-5).to(DEV)
    norm.weight.data = torch.randn(n, device=DEV)
    norm = norm.to(dt)
    x = torch.randn(1, k, device=DEV, dtype=dt)
    w = torch.randn(n, k, device=DEV, dtype=dt)
    b = torch.randn(n, device=DEV, dtype=dt) if bias else None
    residual = torch.randn(1, n, device=DEV, dtype=dt) * 4
    kw = {"block_k": 64 if DEV == "cpu" else None, "block_n": block_n}
    for rep in range(2):
        want_res = (gemv(x, w, bias=b, **kw).float() + residual.float()).to(dt)  # y rounded, then the sum
        want = norm._norm(want_res)  # the layer's torch formula (float32 statistics)
        got_res = residual.clone()
        got = gemv(x, w, bias=b, add_norm=AddNorm(got_res, norm.weight, norm.eps, norm.ticket), **kw)
        assert int(norm.ticket.item()) == 0, rep
        assert torch.equal(got_res, want_res), rep
        assert rel(got.float(), want.float()) < (1e-2 if dt == torch.bfloat16 else 1e-6), rep
        residual = got_res


@pytest.mark.parametrize(
    ("n", "k", "bias", "block_n"),
    [(40, 64, False, None), (19, 300, True, None), (256, 128, True, 16), (48, 2048, False, None)],
)
def test_gemv_add_into_then_norm_in_is_add_norm(n: int, k: int, bias: bool, block_n: int | None) -> None:
    """The deferred norm: gemv(add_into=) adds the projection into the residual in place (the bits
    AddNorm's add writes) and returns it; a launch with norm_in= over that residual equals the same
    launch over RMSNorm(residual) (K 300: masked tiles; 2048: whole tiles, the unmasked path)."""
    from inferfleet.worker.kernels.gemv import NormIn, gemv

    torch.manual_seed(4)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(1, n, device=DEV, dtype=dt)
    w_in = torch.randn(k, n, device=DEV, dtype=dt)  # the producer: n -> k, adds into a [1, k] stream
    w = torch.randn(n, k, device=DEV, dtype=dt)  # the consumer: k -> n, reads the normalized stream
    b = torch.randn(n, device=DEV, dtype=dt) if bias else None
    norm = RMSNorm(k, 1e-5).to(DEV)
    norm.weight.data = torch.randn(k, device=DEV)
    norm = norm.to(dt)
    kw = {"block_k": 64 if DEV == "cpu" else None, "block_n": block_n}
    residual = torch.randn(1, k, device=DEV, dtype=dt) * 4
    want_res = (gemv(x, w_in, block_k=kw["block_k"]).float() + residual.float()).to(dt)
    got_res = residual.clone()
    assert gemv(x, w_in, add_into=got_res, block_k=kw["block_k"]) is got_res
    assert torch.equal(got_res, want_res)
    want = gemv(rmsnorm(got_res, norm.weight, norm.eps), w, bias=b, **kw)
    got = gemv(got_res, w, bias=b, norm_in=NormIn(norm.weight, norm.eps), **kw)
    assert torch.equal(got_res, want_res), "norm_in must not write its input"
    assert rel(got.float(), want.float()) < (1e-2 if dt == torch.bfloat16 else 1e-6)
    # the norm is applied: the raw residual gives another result
    assert rel(gemv(got_res, w, bias=b, **kw).float(), want.float()) > 0.1


@pytest.mark.parametrize(
    ("inter", "k", "bias", "block_n"),
    [(20, 64, False, None), (37, 300, True, None), (64, 128, False, 16), (36, 2048, True, None)],
)
def test_gemv_silu_mul_matches_projection_then_silu(
    inter: int, k: int, bias: bool, block_n: int | None
) -> None:
    """gemv(silu_mul=True) over a merged [gate; up] matrix is the projection then silu_and_mul: the
    same bits (each program takes the gate and up rows of its channels; inter 37: masked channels)."""
    from inferfleet.worker.kernels.gemv import gemv

    torch.manual_seed(2)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(1, k, device=DEV, dtype=dt)
    w = torch.randn(2 * inter, k, device=DEV, dtype=dt)
    b = torch.randn(2 * inter, device=DEV, dtype=dt) if bias else None
    kw = {"block_k": 64 if DEV == "cpu" else None, "block_n": block_n}
    want = silu_and_mul(gemv(x, w, bias=b, **kw))
    got = gemv(x, w, bias=b, silu_mul=True, **kw)
    assert got.shape == (1, inter)
    assert torch.equal(got, want) if DEV == "cuda" else rel(got, want) < 1e-6


def test_gemv_prefetch_past_whole_tiles_is_cut_to_k() -> None:
    """A prefetch of more tiles than K holds, K whole tiles: the launch loads K's tiles only (the
    unmasked whole-tile code); K not whole tiles keeps the prefetch (masked loads past K)."""
    from inferfleet.worker.kernels.gemv import gemv, prefetch_tiles

    assert prefetch_tiles(4, 1024, 512) == 2 and prefetch_tiles(4, 4096, 512) == 4
    assert prefetch_tiles(3, 300, 64) == 3 and prefetch_tiles(2, 32, 64) == 2
    torch.manual_seed(3)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(1, 128, device=DEV, dtype=dt)
    w = torch.randn(24, 128, device=DEV, dtype=dt)
    got = gemv(x, w, block_k=64, prefetch=4)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert rel(got.float(), ref) < (1e-2 if dt == torch.bfloat16 else 1e-5)
