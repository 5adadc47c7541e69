"""Decode projections as the decode step runs them: a dependent chain, in one CUDA graph.

For each weight precision (bf16, fp8 e4m3 with row scales, GPTQ 4-bit group 128) this builds 32
layers of Llama-3.1-8B projection weights (qkv, o, gate_up, down; distinct tensors, so nothing
is served from L2) and chains them the way a decoder layer does, each kernel reading the previous
one's output. It times graph replays of that chain for kernels/gemv.py's tensor-core path with the tiles of
the kernels it replaced (skinny_gemm, w8_gemm) and kernels/gptq_gemm.py's gptq_gemm, then gemv's
one-row path and kernels/gptq_row4.py (GPTQ, Gluon) without and with programmatic dependent launch, a sweep of tile
configurations per shape, and cuBLAS for bf16. Every variant is first
checked against a float32 reference on one layer. Prints a table last; --out writes JSON.

    python bench/gemv_bench.py --out DIR [--rows 1] [--only bf16,fp8,gptq]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import microbench
import torch
from inferfleet.worker.kernels.gemv import gemv
from inferfleet.worker.kernels.gptq_gemm import gptq_gemm, gptq_stream
from inferfleet.worker.kernels.gptq_row4 import gptq_row4
from inferfleet.worker.quant.gptq import dequantize_kernel_layout
from torch.nn import functional as F

# the decoder layer's projections: microbench's shapes without the LM head
SHAPES = microbench.LAYER_SHAPES
LAYERS = 32
GROUP = 128
DEV = torch.device("cuda")


def make_layers(precision: str) -> list[dict[str, tuple]]:
    layers = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for _ in range(LAYERS):
        layer = {}
        for name, (n, k) in SHAPES.items():
            if precision == "bf16":
                w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=g) * k**-0.5
                layer[name] = (w,)
            elif precision == "fp8":
                w = (torch.randn(n, k, device=DEV, generator=g) * 64).to(torch.float8_e4m3fn)
                s = torch.full((n,), k**-0.5 / 64, device=DEV)
                layer[name] = (w, s)
            else:
                qw = torch.randint(
                    -(2**31), 2**31 - 1, (n, k // 8), device=DEV, dtype=torch.int32, generator=g
                )
                sc = torch.full((n, k // GROUP), k**-0.5 / 4, device=DEV, dtype=torch.float16)
                z = torch.full((n, k // GROUP), 8, device=DEV, dtype=torch.uint8)
                layer[name] = (qw, sc, z)
        layers.append(layer)
    return layers


def weight_bytes(layers: list[dict[str, tuple]], names=SHAPES) -> int:
    return sum(t.numel() * t.element_size() for lay in layers for nm in names for t in lay[nm])


def reference(precision: str, x: torch.Tensor, p: tuple) -> torch.Tensor:
    if precision == "bf16":
        w = p[0].float()
    elif precision == "fp8":
        w = p[0].float() * p[1][:, None]
    else:
        qw, sc, z = p
        g_idx = torch.arange(qw.shape[1] * 8, device=qw.device, dtype=torch.int32) // GROUP
        w = dequantize_kernel_layout(qw, sc, z, g_idx, 4)
    return x.float() @ w.t()


def variants(precision: str) -> dict[str, object]:
    """name -> fn(x, params, **launch) -> y; "new" and "new+pdl" are the current one-row kernel
    without and with programmatic dependent launch (the sweep passes its launch options to them)."""
    v: dict[str, object] = {}
    if precision == "bf16":
        v["cublas"] = lambda x, p: F.linear(x, p[0])
        # the tensor-core path with the former skinny_gemm's tiles ([16, 256], 4 stages)
        v["tensor cores"] = lambda x, p: gemv(x, p[0], fma=False, block_n=16, block_k=256, use_pdl=False)
        current = lambda x, p, **kw: gemv(x, p[0], **kw)  # noqa: E731
    elif precision == "fp8":
        # the tensor-core path with the former w8_gemm's tiles ([16, 512], 4 stages)
        v["tensor cores"] = lambda x, p: gemv(
            x, p[0], p[1], fma=False, block_n=16, block_k=512, use_pdl=False
        )
        current = lambda x, p, **kw: gemv(x, p[0], p[1], **kw)  # noqa: E731
    else:
        g_idx = {k: torch.arange(k, device=DEV, dtype=torch.int32) // GROUP for _, k in SHAPES.values()}
        v["gptq_gemm"] = lambda x, p: gptq_gemm(x, p[0], p[1], p[2], g_idx[x.shape[1]], 4, GROUP)
        # the Triton one-row kernel the Gluon kernel replaced (the third session's measured path)
        v["triton stream+pdl"] = lambda x, p: gptq_stream(x, *p, 4, GROUP, use_pdl=True)
        current = lambda x, p, **kw: gptq_row4(x, *p, GROUP, **kw)  # noqa: E731
    v["new"] = functools.partial(current, use_pdl=False)
    v["new+pdl"] = functools.partial(current, use_pdl=True)
    if precision == "gptq":  # the engine skips the overflow check for a norm's output (qkv, gate/up)
        v["new+pdl, no overflow check"] = functools.partial(current, use_pdl=True, overflow_guard=False)
    if precision != "gptq":  # gemv.py: weight tiles loaded before the PDL wait (the default is 2)
        for tiles in (1, 3):
            v[f"pdl, prefetch {tiles}"] = functools.partial(current, use_pdl=True, prefetch=tiles)
    return v


def _gemv_launches(*tiles: tuple[int, ...]) -> list[dict]:
    """kernels/gemv.py launches from (block_n, block_k, num_stages, prefetch[, num_warps]), 4 warps
    unless a fifth value says otherwise."""
    return [
        dict(block_n=t[0], block_k=t[1], num_warps=t[4] if len(t) > 4 else 4, num_stages=t[2], prefetch=t[3])
        for t in tiles
    ]


SWEEP = {  # (the first sweep's wider grid and its results: docs/bench/*-gemv-sweep1-*.json)
    "bf16": _gemv_launches(
        (8, 512, 4, 1),
        (8, 512, 4, 0),
        (16, 256, 4, 0),
        (16, 256, 4, 1),
        (8, 512, 5, 1),
        (8, 512, 4, 2),
        (8, 512, 4, 3),
        # seventh session: 8 warps
        (8, 512, 4, 2, 8),
        (16, 512, 4, 2, 8),
        (8, 1024, 3, 2, 8),
        (16, 256, 4, 2, 8),
    ),
    "fp8": _gemv_launches(
        (8, 1024, 4, 1),
        (8, 1024, 4, 0),
        (8, 512, 6, 1),
        (16, 512, 4, 0),
        (16, 512, 4, 1),
        (8, 1024, 4, 2),
        (8, 1024, 4, 3),
        (8, 512, 6, 2),
        (8, 512, 6, 3),
        # seventh session: 8 warps, longer or taller tiles
        (8, 1024, 4, 2, 8),
        (16, 1024, 4, 2, 8),
        (16, 512, 4, 2, 8),
        (8, 2048, 3, 2, 8),
        (16, 1024, 3, 2, 8),
        (32, 512, 4, 2, 8),
    ),
    # kernels/gptq_row4.py's (rows, words per run, warps along N, warps along K, products: 1 or 2
    # float32 chains or 0 for fp16 pairs, tiles in flight)
    "gptq": [
        dict(config=c)
        for c in (
            (4, 2, 4, 2, 1, 1),
            (4, 2, 4, 2, 2, 1),
            (4, 2, 2, 2, 2, 1),
            (4, 2, 4, 2, 0, 1),
            (4, 2, 4, 2, 0, 2),
            (4, 2, 2, 2, 0, 1),
            (4, 2, 2, 2, 0, 2),
            (8, 2, 2, 2, 0, 1),
            (8, 2, 2, 2, 0, 2),
            (8, 2, 4, 1, 0, 1),
            (8, 2, 4, 1, 0, 2),
            (8, 4, 4, 1, 0, 1),
            (8, 4, 2, 2, 0, 1),
            (4, 4, 4, 2, 0, 1),
            (4, 4, 2, 2, 0, 1),
            (16, 2, 2, 2, 0, 1),
            # seventh session: four warps along K (tiles of 2,048 columns: a 4,096-column row is two
            # tiles, both in flight), and runs of two rows per thread
            (4, 2, 4, 4, 0, 2),
            (4, 2, 2, 4, 0, 2),
            (8, 2, 2, 4, 0, 2),
            (4, 2, 2, 4, 0, 1),
            (2, 2, 4, 4, 0, 2),
            (2, 2, 4, 2, 0, 2),
        )
    ],
}


def time_graph(fn, reps: int = 20) -> float:
    """ms per call of fn() replayed from a CUDA graph (median of reps)."""
    return microbench.time_ms(microbench.graph_of(fn).replay, reps, warmup=1)


def chain(fn, layers, x0):
    """One decode step's projections: qkv -> o -> gate_up -> down -> next layer's qkv."""

    def run():
        x = x0
        for lay in layers:
            x = fn(x, lay["qkv"])[:, :4096]
            x = fn(x, lay["o"])
            x = fn(x, lay["gate_up"])[:, :14336]
            x = fn(x, lay["down"])
        return x

    return run


def same_shape_chain(fn, layers, name, rows, cfg=None):
    """32 launches of one projection shape (distinct weights), each reading the previous output
    (down, whose output is narrower than its input, reads a fixed input instead)."""
    n, k = SHAPES[name]
    x0 = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    kw = cfg or {}

    def run():
        x = x0
        for lay in layers:
            y = fn(x, lay[name], **kw)
            x = y[:, :k] if n >= k else x0
        return y

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--only", default="bf16,fp8,gptq")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--shapes", default=None, help="sweep only these microbench shapes (e.g. lm_head: 8 layers), no chain"
    )
    args = ap.parse_args()
    global SHAPES, LAYERS
    if args.shapes:  # distinct weights per layer still, but fewer layers (an 8B lm_head is 1 GB in bf16)
        SHAPES = {name: microbench.SHAPES[name] for name in args.shapes.split(",")}
        LAYERS = 8
    rows = args.rows
    result: dict = {"device": torch.cuda.get_device_name(), "rows": rows, "torch": torch.__version__}
    table = []
    t_start = time.time()
    for precision in args.only.split(","):
        layers = make_layers(precision)
        total = weight_bytes(layers, SHAPES)
        vs = variants(precision)
        res: dict = {"bytes": total, "check": {}, "chain_ms": {}, "per_shape": {}}
        # correctness on one layer, every shape
        x = torch.randn(rows, max(k for _, k in SHAPES.values()), device=DEV, dtype=torch.bfloat16)
        for vname, fn in vs.items():
            worst = 0.0
            for sname, (_n, k) in SHAPES.items():
                ref = reference(precision, x[:, :k], layers[0][sname])
                got = fn(x[:, :k].contiguous(), layers[0][sname]).float()
                worst = max(worst, ((got - ref).norm() / ref.norm()).item())
            res["check"][vname] = worst
            assert worst < 2e-2, (precision, vname, worst)
        x0 = torch.randn(rows, 4096, device=DEV, dtype=torch.bfloat16)
        for vname, fn in vs.items() if not args.shapes else ():
            ms = time_graph(chain(fn, layers, x0))
            res["chain_ms"][vname] = ms
            table.append((precision, "chain " + vname, ms, total / ms / 1e6))
        if not args.no_sweep:
            baselines = [v for v in vs if not v.startswith("new")]  # timed once per shape, not swept
            for sname in SHAPES:
                sb = weight_bytes(layers, [sname])
                shape_res = {}
                for vname in baselines:
                    shape_res[vname] = time_graph(same_shape_chain(vs[vname], layers, sname, rows))
                for pdl_name in ("new", "new+pdl"):
                    for cfg in SWEEP[precision]:
                        key = f"{pdl_name} " + ",".join(f"{v}" for v in cfg.values())
                        try:
                            if pdl_name == "new":  # every swept launch checked once per shape
                                k = SHAPES[sname][1]
                                got = vs[pdl_name](x[:, :k].contiguous(), layers[0][sname], **cfg)
                                ref = reference(precision, x[:, :k], layers[0][sname])
                                err = ((got.float() - ref).norm() / ref.norm()).item()
                                res["check"][f"{sname} {key}"] = err
                                assert err < 2e-2, (precision, sname, key, err)
                            shape_res[key] = time_graph(
                                same_shape_chain(vs[pdl_name], layers, sname, rows, cfg)
                            )
                        except Exception as e:  # a config Triton cannot build (registers, shared memory)
                            shape_res[key] = f"error: {type(e).__name__}: {str(e)[:120]}"
                res["per_shape"][sname] = {"bytes": sb, "ms": shape_res}
                print(
                    precision,
                    sname,
                    {key: round(sb / v / 1e6) if isinstance(v, float) else v for key, v in shape_res.items()},
                    flush=True,
                )
                best = min((v, k) for k, v in shape_res.items() if isinstance(v, float))
                for vname in baselines:
                    ms = shape_res[vname]
                    table.append((precision, f"{sname} x32 {vname}", ms, sb / ms / 1e6))
                table.append((precision, f"{sname} x32 best: {best[1]}", best[0], sb / best[0] / 1e6))
        result[precision] = res
        del layers
        torch.cuda.empty_cache()
    result["seconds"] = time.time() - t_start
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"gemv_bench_m{rows}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'precision':9} {'what':58} {'ms':>8} {'GB/s':>7}")
    for p, w, ms, gbs in table:
        print(f"{p:9} {w:58} {ms:8.3f} {gbs:7.0f}")
    print("checks (max rel err):", {p: result[p]["check"] for p in args.only.split(",")})


if __name__ == "__main__":
    main()
