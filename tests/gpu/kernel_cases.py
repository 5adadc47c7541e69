"""Triton kernels against the torch reference path (collected through tests/gpu/test_kernels.py).

On CPU this file runs in a separate pytest process with TRITON_INTERPRET=1, which executes the
same kernel code with numpy: the interpreter must be chosen before anything imports Triton, and
other test modules (transformers, torch) import it early.
"""

from __future__ import annotations

import os
import random

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
from inferfleet.worker.kernels.elementwise import rmsnorm, rope_and_cache, silu_and_mul  # noqa: E402
from inferfleet.worker.kernels.paged_attention import paged_attention  # noqa: E402
from inferfleet.worker.layers.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
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
        max_seq_len=max(ctx_lens),
        query_lens_host=query_lens,
        seq_lens_host=ctx_lens,
        block_tables_host=tables,
    )
    return meta


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
    out = torch.full_like(q, float("nan"))
    paged_attention(
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.max_query_len,
        scale,
        num_splits=splits,
    )
    assert not out.isnan().any()
    assert rel(out, ref) < 1e-5


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
        for kw in ({"fma": False}, {"use_pdl": DEV == "cuda"}, {"prefetch": False}):
            got = gemv(x, w, bias=b, block_k=64 if DEV == "cpu" else None, **kw)
            assert rel(got.float(), ref) < tol, kw
