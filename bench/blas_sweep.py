"""bf16 projections at the row counts of W1's steps (64-512), through every GEMM route torch and
cuBLASLt offer: is cuBLAS's pick for `F.linear` the fastest there?

For each Llama-3.1-8B projection shape and row count it times 32 launches over 32 distinct weights
(7-15 GB, so nothing comes from L2), captured in one CUDA graph, for:

- `cublas`: F.linear(x, W) with W [N, K], the engine's path above 16 rows (torch's default BLAS);
- `cublaslt`: the same with torch.backends.cuda.preferred_blas_library("cublaslt");
- `nn`: x @ Wt with the weight stored transposed, [K, N] contiguous (a load-time choice);
- `lt#i`: each algorithm cuBLASLt's heuristics return for x @ W^T (nvmath-python's Matmul, its
  plan's first --algos entries; skipped where nvmath is not installed: it travels as a wheel).

Every route is first checked against a float32 reference on one weight. Prints, per shape and row
count, microseconds per launch for each route and the fastest cuBLASLt algorithm; --out writes JSON.

    python bench/blas_sweep.py --out DIR [--rows 64,128,256,512] [--algos 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import microbench
import torch
from torch.nn import functional as F

DEV = torch.device("cuda")
LAYERS = 32


def time_graph_us(fn, reps: int = 20) -> float:
    """us per launch of fn() (which makes LAYERS launches), replayed from one CUDA graph."""
    return microbench.time_ms(microbench.graph_of(fn).replay, reps, warmup=2) * 1e3 / LAYERS


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def torch_routes(x, ws, wts) -> dict:
    def linear():
        for w in ws:
            F.linear(x, w)

    def nn():
        for wt in wts:
            torch.mm(x, wt)

    return {"cublas": linear, "nn": nn}


def lt_routes(x, ws, algos: int, ref) -> tuple[dict, dict]:
    """cuBLASLt's heuristic algorithms for x @ W^T through nvmath-python: (routes, checks)."""
    try:
        from nvmath.linalg.advanced import Matmul, MatmulPlanPreferences
    except ImportError:
        return {}, {}
    routes, checks = {}, {}
    mms = [Matmul(x, w.t()) for w in ws]
    for mm in mms:  # every layer's object planned alike, then told which of its algorithms to run
        mm.plan(preferences=MatmulPlanPreferences(limit=algos))
    for i in range(len(mms[0].algorithms)):
        pairs = []
        for mm in mms:
            if i >= len(mm.algorithms):
                break
            pairs.append((mm, mm.algorithms[i]))
        if len(pairs) < len(mms):
            continue
        try:
            checks[f"lt#{i}"] = rel_err(mms[0].execute(algorithm=pairs[0][1]), ref)
        except Exception as e:  # an algorithm cuBLASLt lists but will not run here
            checks[f"lt#{i}"] = f"error: {type(e).__name__}: {str(e)[:100]}"
            continue

        def run(pairs=pairs):
            for mm, a in pairs:
                mm.execute(algorithm=a)

        routes[f"lt#{i}"] = run
    return routes, checks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="64,128,192,256,320,384,512")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--algos", type=int, default=16)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}, "check": {}}
    try:
        import nvmath

        result["nvmath"] = nvmath.__version__
    except ImportError:
        result["nvmath"] = None
    table = []
    t0 = time.time()
    g = torch.Generator(device=DEV).manual_seed(0)
    for name in args.shapes.split(","):
        n, k = microbench.SHAPES[name]
        ws = [
            torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=g) * k**-0.5 for _ in range(LAYERS)
        ]
        wts = [w.t().contiguous() for w in ws]
        gb = n * k * 2 / 1e9
        for m in rows:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=g)
            ref = x.float() @ ws[0].float().t()
            us, check = {}, {}
            routes = torch_routes(x, ws, wts)
            check["cublas"] = rel_err(F.linear(x, ws[0]), ref)
            check["nn"] = rel_err(torch.mm(x, wts[0]), ref)
            for route, fn in routes.items():
                us[route] = time_graph_us(fn)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            check["cublaslt"] = rel_err(F.linear(x, ws[0]), ref)
            us["cublaslt"] = time_graph_us(routes["cublas"])
            us["nn cublaslt"] = time_graph_us(routes["nn"])
            torch.backends.cuda.preferred_blas_library("cublas")
            try:
                lt, lt_check = lt_routes(x, ws, args.algos, ref)
            except Exception as e:  # nvmath present but not usable here: say so, keep the torch routes
                lt, lt_check = {}, {"nvmath": f"error: {type(e).__name__}: {str(e)[:160]}"}
            check.update(lt_check)
            for route, fn in lt.items():
                try:
                    us[route] = time_graph_us(fn)
                except Exception as e:
                    us[route] = f"error: {type(e).__name__}: {str(e)[:100]}"
            for route, err in check.items():
                if isinstance(err, float):
                    assert err < 2e-2, (name, m, route, err)
            key = f"{name} m{m}"
            result["us"][key], result["check"][key] = us, check
            timed = {r: v for r, v in us.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            lts = {r: v for r, v in timed.items() if r.startswith("lt#")}
            lt_best = min(lts, key=lts.get) if lts else None
            table.append(
                (name, m, us["cublas"], us["cublaslt"], us["nn"], us["nn cublaslt"],
                 lt_best, lts.get(lt_best), best, timed[best], gb / timed[best] * 1e6)
            )  # fmt: skip
            print(key, {r: round(v, 1) if isinstance(v, float) else v for r, v in us.items()}, flush=True)
            print(
                "   check",
                {r: f"{v:.1e}" if isinstance(v, float) else v for r, v in check.items()},
                flush=True,
            )
        del ws, wts
        torch.cuda.empty_cache()
    result["seconds"] = time.time() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    print(
        f"\n{result['device']}, torch {result['torch']}, nvmath {result['nvmath']}; us per launch, 32 weights"
    )
    print(
        f"{'shape':8} {'rows':>4} {'cublas':>7} {'lt':>7} {'nn':>7} {'nn lt':>7} {'lt best':>14} {'best':>16} GB/s"
    )
    for name, m, cb, lt, nn, nnlt, ltb, ltv, best, bv, gbs in table:
        ltcol = f"{ltb} {ltv:.1f}" if ltb else "-"
        print(
            f"{name:8} {m:4d} {cb:7.1f} {lt:7.1f} {nn:7.1f} {nnlt:7.1f} {ltcol:>14} {best + ' ' + f'{bv:.1f}':>16} {gbs:5.0f}"
        )


if __name__ == "__main__":
    main()
