"""Quantization kernels against their torch references (collected through tests/gpu/test_kernels.py).

On CPU this file runs with TRITON_INTERPRET=1 in the subprocess test_kernels.py starts (float32
activations); on a CUDA machine, `pytest tests/gpu/quant_cases.py` runs the same cases natively in
bf16. References: kernels/gemv.py (8-bit weights) against the widened-codes matmul, kernels/fp8.py against
quant/fp8.py's torch per-token quantization, kernels/gptq_gemm.py and kernels/gptq_row4.py against
quant/gptq.py's dequantization of the same (processed) layer. The Gluon kernel of gptq_row4.py runs
on CUDA only (Gluon has no interpreter): its cases are skipped under TRITON_INTERPRET.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interp

    if not getattr(_interp, "_inferfleet_index_patch", False):
        # Triton's interpreter keeps scalars as 1-element numpy arrays and converts them with int(),
        # which NumPy >= 2.4 refuses for arrays of ndim 1 (the same patch as kernel_cases.py)
        _orig_patch_tensor = _interp._patch_lang_tensor

        def _patch_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            _orig_patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_tensor
        _interp._inferfleet_index_patch = True

from inferfleet.worker.kernels.elementwise import silu_and_mul  # noqa: E402
from inferfleet.worker.kernels.fp8 import quant_fp8_per_token  # noqa: E402
from inferfleet.worker.kernels.gemv import AddNorm, gemv  # noqa: E402
from inferfleet.worker.kernels.gptq_gemm import gptq_dequant, gptq_gemm, gptq_stream, stream_ok  # noqa: E402
from inferfleet.worker.layers.linear import Linear  # noqa: E402
from inferfleet.worker.layers.norm import RMSNorm  # noqa: E402
from inferfleet.worker.quant import fp8 as qfp8  # noqa: E402
from inferfleet.worker.quant.gptq import gptq_dequantize, pack_int32  # noqa: E402
from inferfleet.worker.quant.int8 import quantize_weight_int8  # noqa: E402
from inferfleet.worker.quant.spec import QuantConfig  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 1e-2 if DEV == "cuda" else 1e-5
# one row of a qkv-sized 8-bit layer takes its own one-row launch ([8, 512] tiles, gemv.default_config);
# too large for the CPU interpreter's time
QKV_SHAPED = [(1, 6144, 4096, False)] if DEV == "cuda" else []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 40, 64, False), (3, 17, 300, True), (16, 64, 256, False), (33, 48, 96, True), (130, 80, 64, True), (64, 16400, 64, True), (200, 96, 256, False), (1, 40, 2048, True), (1, 24, 4096, False), (1, 32, 1024, True), *QKV_SHAPED])  # fmt: skip
def test_gemv_8bit_matches_widened_reference(kind: str, m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=g)
    if kind == "int8":
        q, s = quantize_weight_int8(w)
    else:
        q, s = qfp8.quantize_weight_fp8(w)
    x = torch.randn(m, k, generator=g).to(DEV, DT)
    b = torch.randn(n, generator=g).to(DEV, DT) if bias else None
    q, s = q.to(DEV), s.to(DEV)
    ref = (x.float() @ q.float().t()) * s + (b.float() if b is not None else 0.0)
    got = gemv(x, q, s, b, block_k=64 if DEV == "cpu" else None)
    assert got.dtype == DT and rel(got.float(), ref) < TOL
    if m == 1:  # the one-row path (CUDA-core FMAs) and the tensor-core path agree
        dot = gemv(x, q, s, b, block_k=64 if DEV == "cpu" else None, fma=False)
        assert rel(dot.float(), ref) < TOL


def test_fp8_per_token_quant_matches_torch() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=g) * torch.tensor([1.0, 1e-3, 50.0, 0.0, 7.0])[:, None]
    x = x.to(DEV, DT)
    q, s = quant_fp8_per_token(x, qfp8.FP8_MAX, qfp8.MIN_ACT_SCALE, block=128)
    # the reference runs on the CPU: IEEE division, and an e4m3 cast that rounds ties to even, as
    # the kernel does. torch's CUDA expression did not agree on exact ties: on the H100 two values
    # whose quotient x / scale is exactly 4.75 and 304 got 4.5 and 288 from it, 5 and 320 (round to
    # nearest even, as on the CPU) from the kernel (whether its division or its cast differs was
    # not isolated)
    rq, rs = (t.to(DEV) for t in qfp8.quantize_act_fp8(x.cpu()))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.allclose(s, rs, rtol=1e-6, atol=0)
    assert torch.equal(s[3], torch.full((1,), qfp8.MIN_ACT_SCALE, device=DEV))  # an all-zero row
    got, want = q.float(), rq.float()
    if os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter's float32 -> e4m3 cast loses the carry when rounding up into the next
        # binade (124.3 becomes 64, not 128); hardware conversion does not: accept exactly those
        carry = (got != want) & (got * 2 == want) & (torch.frexp(want)[0].abs() == 0.5)
        got = torch.where(carry, want, got)
    bad = (got != want).nonzero().tolist()
    detail = [(r, c, float(x[r, c]), float(s[r, 0]), float(got[r, c]), float(want[r, c])) for r, c in bad[:8]]
    assert not bad, f"{len(bad)} codes differ (row, col, x, scale, kernel, torch): {detail}"


def _gptq_layer(
    k: int, sizes: list[int], bits: int, group: int, act_order: bool, seed: int
) -> tuple[Linear, torch.Tensor]:
    """A processed GPTQ Linear on DEV (random codes/scales/zeros in the checkpoint layout), and the
    reference W [N, K] float32 from the checkpoint tensors."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    groups = 1 if group == -1 else -(-k // group)
    gs = k if group == -1 else group
    if act_order:
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    codes = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).to(torch.float16)
    qweight = pack_int32(codes, bits, 0)
    qzeros = pack_int32((zeros - 1) & (2**bits - 1), bits, 1)  # v1 layout
    ref = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset=1)
    quant = QuantConfig("gptq", True, bits=bits, group_size=group, desc_act=act_order, zero_offset=1)
    with torch.device(DEV):
        layer = Linear(k, sizes, quant=quant)
    lo = 0
    assert layer.method is not None
    for i, size in enumerate(sizes):
        part = slice(lo, lo + size)
        p = 32 // bits
        layer.method.load(layer, "qweight", i, qweight[:, part], "qweight")
        layer.method.load(layer, "qzeros", i, qzeros[:, lo // p : (lo + size) // p], "qzeros")
        layer.method.load(layer, "scales", i, scales[:, part], "scales")
        layer.method.load(layer, "g_idx", i, g_idx, "g_idx")
        lo += size
    layer.method.process_after_loading(layer)
    return layer, ref.to(DEV)


GPTQ_CASES = [
    # (m, K, output shards, bits, group, act-order, split_k)
    (1, 256, [64], 4, 128, False, 1),  # one scale row per K block
    (3, 256, [32, 16, 16], 4, 128, True, 1),  # merged qkv-like shards, act-order sorted at load
    (5, 192, [48], 4, 32, False, 2),  # group 32 (BLOCK_K 32), split-K with atomics
    (16, 160, [40], 4, 32, True, 1),
    (33, 128, [24], 8, 64, False, 1),  # 8-bit codes
    (2, 96, [16], 4, -1, False, 1),  # one group per row
    (4, 200, [32], 4, 48, False, 1),  # groups not a multiple of the K block: gathered per element
    (64, 128, [16, 16], 2, 32, True, 2),
    (100, 128, [64], 4, 32, False, 1),  # M tiled over the grid (W1-sized decode batches)
    (200, 96, [32, 32], 4, 32, True, 2),
    (256, 512, [64, 72], 4, 128, False, None),  # [128, 64] tiles (BIG_M): two M blocks, ragged N
    (130, 256, [96], 4, 128, True, None),  # one full M block and a 2-row one, act-order
]


@pytest.mark.parametrize(("m", "k", "sizes", "bits", "group", "act", "split"), GPTQ_CASES)
def test_gptq_gemm_matches_dequantized_reference(m, k, sizes, bits, group, act, split) -> None:  # type: ignore[no-untyped-def]
    layer, w_ref = _gptq_layer(k, sizes, bits, group, act, seed=m + k)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g).to(DEV, DT)
    bias = torch.randn(sum(sizes), generator=g).to(DEV, DT)
    ref = x.float() @ w_ref.t() + bias.float()
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    got = gptq_gemm(
        xp, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.g_idx_k, bits, layer.group_k,
        bias=bias, split_k=split,
    )  # fmt: skip
    assert got.dtype == DT and rel(got.float(), ref) < TOL
    # the layer's own forward (no bias; kernel on CUDA, torch dequantization elsewhere) agrees too
    assert rel(layer(x).float(), ref - bias.float()) < TOL


STREAM_CASES = [
    # (m, K, output shards, bits, group, act-order, block_k): contiguous groups only
    (1, 256, [64], 4, 128, False, None),  # block_k = K = 256: two groups in the one block
    (1, 512, [32, 16, 16], 4, 32, True, 128),  # four groups per block, act-order sorted at load
    (1, 256, [24], 4, 256, False, 64),  # a group spans several K blocks
    (1, 128, [40], 8, 64, False, None),  # 8-bit codes
    (1, 128, [16, 16], 2, 32, True, 64),  # 2-bit codes
    (3, 256, [48], 4, 64, False, 64),  # several rows: the tensor-core path
]


@pytest.mark.parametrize(("m", "k", "sizes", "bits", "group", "act", "bk"), STREAM_CASES)
def test_gptq_stream_matches_dequantized_reference(m, k, sizes, bits, group, act, bk) -> None:  # type: ignore[no-untyped-def]
    layer, w_ref = _gptq_layer(k, sizes, bits, group, act, seed=3 * m + k)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=g).to(DEV, DT)
    bias = torch.randn(sum(sizes), generator=g).to(DEV, DT)
    ref = x.float() @ w_ref.t() + bias.float()
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    assert stream_ok(layer.group_k, bits, k, m)
    got = gptq_stream(
        xp, layer.qweight_t, layer.scales_t, layer.zeros_t, bits, layer.group_k, bias, block_k=bk
    )
    assert got.dtype == DT and rel(got.float(), ref) < TOL
    if m == 1:  # the layer's one-row forward on CUDA (this kernel, or gptq_row4 for 4-bit codes) agrees
        assert rel(layer(x).float(), ref - bias.float()) < TOL


ROW4_CASES = [
    # (K, output shards, group, act-order, x dtype, launch (rows, words, warps_n, warps_k, chains,
    # depth) or None)
    (4096, [64, 32], 128, False, torch.bfloat16, None),  # default launch, no masks (whole tiles)
    (4096, [32, 8], 128, True, torch.bfloat16, (4, 2, 4, 1, 2, 1)),  # N = 40, tiles of 16 rows: masked
    (2176, [32], 128, False, torch.bfloat16, (4, 4, 2, 2, 1, 2)),  # K not a multiple of the tile: masked tail
    (1024, [24], 64, False, torch.float16, (4, 4, 2, 2, 2, 1)),  # fp16 activations
    (512, [16], 16, True, torch.bfloat16, None),  # groups of 16: two words per thread run
    (256, [16], 8, False, torch.bfloat16, (4, 4, 1, 4, 1, 1)),  # groups of 8: one word per run
    (4096, [48, 16], 128, False, torch.bfloat16, (4, 2, 4, 2, 2, 1)),  # the launch of qkv-sized layers
    # products in fp16 pairs (chains 0), one or two tiles in flight
    (4096, [64, 32], 128, False, torch.bfloat16, (4, 4, 4, 2, 0, 1)),
    (4096, [32, 8], 128, True, torch.bfloat16, (8, 2, 2, 2, 0, 2)),  # N = 40: masked rows
    (2176, [32], 128, False, torch.bfloat16, (4, 2, 2, 2, 0, 2)),  # masked K tail: 3 tiles, the last partial
    (2048, [32], 128, False, torch.bfloat16, (4, 2, 4, 2, 0, 2)),  # exactly two tiles: no loop trip
    (1152, [32], 128, False, torch.bfloat16, (4, 2, 4, 2, 0, 2)),  # two tiles, the second partial
    (1024, [24], 64, False, torch.float16, (4, 4, 2, 2, 0, 2)),  # fp16 activations (prmt pairs)
    (256, [16], 8, False, torch.bfloat16, (4, 4, 1, 4, 0, 2)),  # one tile: depth falls back to 1
    (4096, [64], 128, False, torch.bfloat16, (4, 1, 4, 2, 0, 2)),  # one word per run, 8 tiles
    (4096, [64, 32], 128, False, torch.bfloat16, (4, 2, 4, 2, 1, 2)),  # float32 products, depth 2
    (4096, [64, 32], 128, False, torch.bfloat16, (8, 4, 4, 1, 0, 1)),  # runs of 4 words in fp16
    (512, [70000], 128, False, torch.bfloat16, None),  # a vocabulary-sized lm_head's launch; masked rows
]


@pytest.mark.skipif(
    DEV != "cuda", reason="Gluon kernels have no CPU interpreter (the Triton path runs there)"
)
@pytest.mark.parametrize(("k", "sizes", "group", "act", "dtype", "cfg"), ROW4_CASES)
def test_gptq_row4_matches_dequantized_reference(k, sizes, group, act, dtype, cfg) -> None:  # type: ignore[no-untyped-def]
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4

    layer, w_ref = _gptq_layer(k, sizes, 4, group, act, seed=k + group)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    bias = torch.randn(sum(sizes), generator=g).to(DEV, dtype)
    ref = x.float() @ w_ref.t() + bias.float()
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    got = gptq_row4(xp, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k, bias, config=cfg)
    old = gptq_stream(xp, layer.qweight_t, layer.scales_t, layer.zeros_t, 4, layer.group_k, bias)
    assert got.dtype == dtype and rel(got.float(), ref) < TOL
    # the per-word kernel uses the exact weights, like the Triton path it replaces, with float32
    # products (chains 1, 2) or fp16 products summed per thread run of words (chains 0)
    assert rel(got.float(), old.float()) < 5e-3
    # x at an odd element offset cannot be read as 32-bit pairs in place: copied first, same result
    buf = torch.zeros(1, k + 1, device=DEV, dtype=dtype)
    buf[:, 1:] = xp
    odd = gptq_row4(buf[:, 1:], layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k, bias)
    assert rel(odd.float(), ref) < TOL
    assert rel(layer(x).float(), ref - bias.float()) < TOL  # the layer's forward takes it for one row
    # float32 out (logits): the 16-bit result widened, from the same launch
    wide = gptq_row4(
        xp,
        layer.qweight_t,
        layer.scales_t,
        layer.zeros_t,
        layer.group_k,
        bias,
        config=cfg,
        out_dtype=torch.float32,
    )
    assert wide.dtype == torch.float32 and torch.equal(wide, got.float())


@pytest.mark.skipif(DEV != "cuda", reason="Gluon kernels have no CPU interpreter")
@pytest.mark.parametrize("cfg", [(4, 2, 4, 2, 1, 1), (4, 2, 4, 2, 0, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptq_row4_large_activations(cfg, dtype) -> None:  # type: ignore[no-untyped-def]
    """Activations of a few thousand (the outliers some LLM layers carry) stay finite and accurate
    with fp16 products: a thread run's sums are taken over (q - z) / 16 * x, within fp16 for
    |x| < ~17,000 / words per run whatever the codes. Single outlier channels of 6,000, and a block
    of 32 consecutive ones of 2,000 (whole runs of one or two words, random codes)."""
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4

    layer, w_ref = _gptq_layer(4096, [64], 4, 128, False, seed=21)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4096, generator=g) * 3.0
    x[0, ::97] = 6000.0 * torch.sign(torch.randn(x[0, ::97].shape, generator=g))  # outlier channels
    x[0, 1024:1056] = 2000.0  # one sign over whole runs: the fp16 sums grow with every code
    x = x.to(DEV, dtype)
    ref = x.float() @ w_ref.t()
    got = gptq_row4(x, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k, config=cfg)
    assert torch.isfinite(got).all() and rel(got.float(), ref) < TOL


@pytest.mark.skipif(DEV != "cuda", reason="Gluon kernels have no CPU interpreter")
@pytest.mark.parametrize("cfg", [None, (4, 2, 4, 2, 0, 2), (8, 2, 2, 2, 0, 2), (4, 2, 2, 2, 0, 1)])
def test_gptq_row4_overflowing_fp16_products_fall_back_to_float32(cfg) -> None:  # type: ignore[no-untyped-def]
    """Activations beyond what fp16 products hold (a run of 32 channels at 20,000, one channel at
    70,000, past fp16's 65,504 but a bf16 value): the launch's fp16 sums overflow, the rows come out
    inf or NaN, and the program redoes them in float32, matching the reference; without the check
    the same launch returns non-finite rows. Rows of programs that did not overflow are the fp16
    launch's own (bit for bit those of the unchecked launch)."""
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4

    layer, w_ref = _gptq_layer(4096, [4096], 4, 128, False, seed=22)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4096, generator=g) * 3.0
    x[0, 2048:2080] = 20000.0
    x[0, 3001] = -70000.0
    x = x.to(DEV, torch.bfloat16)
    args = (x, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k)
    unchecked = gptq_row4(*args, config=cfg, overflow_guard=False)
    assert not torch.isfinite(unchecked).all()
    got = gptq_row4(*args, config=cfg)
    ref = x.float() @ w_ref.t()
    assert torch.isfinite(got).all() and rel(got.float(), ref) < TOL
    # an input bound under fp16's reach (Linear.input_bound: a norm's output) skips the check, so a
    # (false) bound of 100 on these inputs lets them overflow; the true one keeps the check
    assert not torch.isfinite(gptq_row4(*args, config=cfg, input_bound=100.0)).all()
    assert torch.equal(gptq_row4(*args, config=cfg, input_bound=70000.0), got)
    small = (torch.randn(1, 4096, generator=g) * 3.0).to(DEV, torch.bfloat16)
    small_args = (small, *args[1:])
    assert torch.equal(
        gptq_row4(*small_args, config=cfg), gptq_row4(*small_args, config=cfg, overflow_guard=False)
    )


def _norm_and_residual(n: int, dtype: torch.dtype, seed: int) -> tuple[RMSNorm, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(n, 1e-5)
    norm.weight.data = torch.randn(n, generator=g)
    return norm.to(DEV, dtype), (torch.randn(1, n, generator=g) * 4).to(DEV, dtype)


def _check_add_norm(project, norm: RMSNorm, residual: torch.Tensor, tol: float) -> None:  # type: ignore[no-untyped-def]
    """project(add_norm) is the projection; with an AddNorm it must equal the projection, rounded,
    added into the residual (in place, the same bits), then RMSNorm'd; twice (the ticket resets)."""
    for rep in range(2):
        want_res = (project(None).float() + residual.float()).to(residual.dtype)
        got_res = residual.clone()
        got = project(AddNorm(got_res, norm.weight, norm.eps, norm.ticket))
        assert int(norm.ticket.item()) == 0, rep
        assert torch.equal(got_res, want_res), rep
        assert rel(got.float(), norm._norm(want_res).float()) < tol, rep
        residual = got_res


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize(("n", "k"), [(40, 64), (300, 128), (24, 2048)])
def test_gemv_8bit_add_norm(kind: str, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    q, s = (quantize_weight_int8 if kind == "int8" else qfp8.quantize_weight_fp8)(
        torch.randn(n, k, generator=g)
    )
    x = torch.randn(1, k, generator=g).to(DEV, DT)
    q, s = q.to(DEV), s.to(DEV)
    norm, residual = _norm_and_residual(n, DT, seed=n + 1)
    bk = 64 if DEV == "cpu" else None
    _check_add_norm(lambda add: gemv(x, q, s, block_k=bk, add_norm=add), norm, residual, TOL)


def _producer_and_consumer(kind: str, n: int, k: int, seed: int):  # type: ignore[no-untyped-def]
    """8-bit (codes, scales) of a consumer [n, k] and of a producer [k, n] feeding its input, the
    producer's input row x [1, n], and a norm with a residual row of width k."""
    g = torch.Generator().manual_seed(seed)
    quantize = quantize_weight_int8 if kind == "int8" else qfp8.quantize_weight_fp8
    consumer = tuple(t.to(DEV) for t in quantize(torch.randn(n, k, generator=g)))
    producer = tuple(t.to(DEV) for t in quantize(torch.randn(k, n, generator=g)))
    x = torch.randn(1, n, generator=g).to(DEV, DT)
    return consumer, producer, x, *_norm_and_residual(k, DT, seed=seed + 1)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize(("n", "k"), [(40, 64), (300, 128), (24, 2048)])
def test_gemv_8bit_add_into_and_norm_in(kind: str, n: int, k: int) -> None:
    """8-bit weights under the deferred norm: add_into adds the projection into the residual (the
    bits of the projection rounded, then added), and norm_in over a residual equals the projection
    of RMSNorm(residual)."""
    from inferfleet.worker.kernels.elementwise import rmsnorm
    from inferfleet.worker.kernels.gemv import NormIn

    (q, s), (q_in, s_in), x, norm, residual = _producer_and_consumer(kind, n, k, seed=n + 7)
    bk = 64 if DEV == "cpu" else None
    want_res = (gemv(x, q_in, s_in, block_k=bk).float() + residual.float()).to(DT)
    got_res = residual.clone()
    assert gemv(x, q_in, s_in, block_k=bk, add_into=got_res) is got_res
    assert torch.equal(got_res, want_res)
    want = gemv(rmsnorm(got_res, norm.weight, norm.eps), q, s, block_k=bk)
    got = gemv(got_res, q, s, block_k=bk, norm_in=NormIn(norm.weight, norm.eps))
    assert rel(got.float(), want.float()) < TOL


@pytest.mark.parametrize("kind", ["int8", "fp8"])
# (24, 44): the producer's last program holds 4 rows past N, and 6 partial sums are not a power of 2
@pytest.mark.parametrize(("n", "k"), [(40, 64), (300, 128), (24, 2048), (24, 44)])
def test_gemv_8bit_add_squares_and_rms_in(kind: str, n: int, k: int) -> None:
    """The split norm (AddSquares, RmsIn): add_squares adds the projection into the residual (the
    same bits as add_into), returns the new residual times the norm's weight and writes one partial
    sum of squares per program; rms_in over them equals the consumer over RMSNorm(residual), for a
    plain output and for silu_mul; twice on CUDA, so that no state carries over between launches."""
    from inferfleet.worker.kernels.elementwise import rmsnorm
    from inferfleet.worker.kernels.gemv import AddSquares, RmsIn, one_row_programs

    (q, s), (q_in, s_in), x, norm, residual = _producer_and_consumer(kind, n, k, seed=n + 11)
    bk = 64 if DEV == "cpu" else None
    w = q.float() * s.float()[:, None]  # the consumer's weights, dequantized
    # float32 on the interpreter; bf16 on CUDA: one rounding's worth (2^-8), since short rows (k = 44)
    # average few roundings (fp8 silu_mul there: 0.29% against the fused norm's 0.13%)
    slack = 1e-6 if DEV == "cpu" else 2.0**-8
    squares = norm.partial_squares(one_row_programs(k), torch.device(DEV))
    squares.fill_(float("nan"))  # every entry must be written
    assert squares.dtype == torch.float32 and squares.numel() == -(-k // 8)
    for rep in range(2 if DEV == "cuda" else 1):  # the interpreter's minutes: one pass there
        want_res = (gemv(x, q_in, s_in, block_k=bk).float() + residual.float()).to(DT)
        got_res = residual.clone()
        scaled = gemv(x, q_in, s_in, block_k=bk, add_squares=AddSquares(got_res, norm.weight, squares))
        assert torch.equal(got_res, want_res), rep
        assert torch.equal(scaled, (want_res.float() * norm.weight.float()).to(DT)), rep
        rows = torch.nn.functional.pad(want_res.float().reshape(-1), (0, -k % 8))
        want_sq = rows.reshape(-1, 8).pow(2).sum(1)  # a program's 8 rows each
        assert rel(squares, want_sq) < 1e-5, rep
        normed = rmsnorm(got_res, norm.weight, norm.eps)
        rms = RmsIn(squares, norm.eps)
        # against the float32 product of the exact norm: about as close as the fused norm's rounding
        # (RMSNorm rounds twice, the split norm once: 16-bit results differ by ~0.5%, both ways)
        res = got_res.float()
        exact = (res * torch.rsqrt(res.pow(2).mean() + norm.eps) * norm.weight.float()) @ w.t()
        got = gemv(scaled, q, s, block_k=bk, rms_in=rms).float()
        want = gemv(normed, q, s, block_k=bk).float()
        assert rel(got, exact) <= 1.25 * rel(want, exact) + slack, (rep, rel(got, exact), rel(want, exact))
        if n % 2 == 0:
            gate, up = exact.chunk(2, dim=1)  # gate/up rows as silu_mul pairs them (merged_rows)
            act = torch.nn.functional.silu(gate) * up
            got = gemv(scaled, q, s, block_k=bk, rms_in=rms, silu_mul=True).float()
            want = gemv(normed, q, s, block_k=bk, silu_mul=True).float()
            assert rel(got, act) <= 1.25 * rel(want, act) + slack, (rep, rel(got, act), rel(want, act))
        residual = got_res
    with pytest.raises(AssertionError, match="one partial sum per program"):
        gemv(x, q_in, s_in, add_squares=AddSquares(residual.clone(), norm.weight, squares[:-1]))


@pytest.mark.skipif(DEV != "cuda", reason="Gluon kernels have no CPU interpreter")
@pytest.mark.parametrize(
    ("k", "sizes", "act", "cfg"),
    [
        (4096, [4096], False, None),  # o_proj's shape and default launch: 256 programs
        (4096, [32, 8], True, (8, 2, 2, 2, 0, 2)),  # N = 40: masked rows; act-order
        (14336, [4096], False, (4, 2, 2, 2, 0, 1)),  # down_proj's shape, one tile in flight
    ],
)
def test_gptq_row4_add_norm(k, sizes, act, cfg, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4
    from inferfleet.worker.layers import linear

    monkeypatch.setattr(linear, "FUSED_NORM", True)  # the layer-level check below takes the fused path

    layer, _ = _gptq_layer(k, sizes, 4, 128, act, seed=k + len(sizes))
    n = sum(sizes)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(9)).to(DEV, DT)
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    norm, residual = _norm_and_residual(n, DT, seed=n)
    args = (xp, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k)
    _check_add_norm(lambda add: gptq_row4(*args, config=cfg, add_norm=add), norm, residual, TOL)
    # the layer's entry point (act-order permutes x first) agrees with the projection then the norm
    want, want_res = norm(layer(x), residual.clone())
    got_res = residual.clone()
    monkeypatch.setattr(norm, "forward", lambda *a: pytest.fail("add_norm fell back to the separate norm"))
    got, _ = layer.add_norm(x, got_res, norm)
    assert torch.equal(got_res, want_res) and rel(got.float(), want.float()) < TOL


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("k", [128, 2048])  # 2048: whole one-row tiles on CUDA too
def test_gemv_8bit_silu_mul(kind: str, k: int) -> None:
    g = torch.Generator().manual_seed(4)
    q, s = (quantize_weight_int8 if kind == "int8" else qfp8.quantize_weight_fp8)(
        torch.randn(2 * 36, k, generator=g)
    )
    x = torch.randn(1, k, generator=g).to(DEV, DT)
    q, s = q.to(DEV), s.to(DEV)
    bk = 64 if DEV == "cpu" else None
    want = silu_and_mul(gemv(x, q, s, block_k=bk))
    got = gemv(x, q, s, block_k=bk, silu_mul=True)
    assert got.shape == (1, 36) and rel(got.float(), want.float()) < (1e-6 if DEV == "cpu" else 1e-3)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon kernels have no CPU interpreter")
@pytest.mark.parametrize(
    ("k", "inter", "act", "cfg"),
    [
        (4096, 14336, False, None),  # gate_up's shape and default launch
        (4096, 40, True, (8, 2, 4, 1, 0, 2)),  # 40 channels, 16 per program: masked; act-order
        (1024, 64, False, (4, 2, 4, 2, 1, 1)),  # float32 products
    ],
)
def test_gptq_row4_silu_mul(k, inter, act, cfg, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4
    from inferfleet.worker.layers import linear

    monkeypatch.setattr(linear, "FUSED_SILU", True)  # layer.silu_mul below must not return None

    layer, _ = _gptq_layer(k, [inter, inter], 4, 128, act, seed=k + inter)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(8)).to(DEV, DT)
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    args = (xp, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k)
    want = silu_and_mul(gptq_row4(*args, config=cfg))
    assert torch.equal(gptq_row4(*args, config=cfg, silu_mul=True), want)
    assert torch.equal(layer.silu_mul(x), silu_and_mul(layer(x)))  # the layer's entry point


def test_gptq_stream_refuses_uneven_groups() -> None:
    assert not stream_ok(48, 4, 200)  # groups of 48 do not tile 256-column blocks
    assert not stream_ok(0, 4, 256)  # act-order groups left non-contiguous: gathered per element
    assert stream_ok(128, 4, 4096) and stream_ok(4096, 4, 4096)


@pytest.mark.parametrize(("k", "sizes", "bits", "group", "act"), [(256, [32, 32], 4, 128, True), (200, [16], 4, 48, False), (96, [8], 8, -1, False)])  # fmt: skip
def test_gptq_dequant_kernel(k: int, sizes: list[int], bits: int, group: int, act: bool) -> None:
    layer, w_ref = _gptq_layer(k, sizes, bits, group, act, seed=k)
    w = gptq_dequant(
        layer.qweight_t, layer.scales_t, layer.zeros_t, layer.g_idx_k, bits, layer.group_k, dtype=DT
    )
    if layer.perm is not None:  # the kernel layout's columns are in sorted-group order
        w_ref = w_ref[:, layer.perm]
    assert w.dtype == DT and rel(w.float(), w_ref) < TOL
