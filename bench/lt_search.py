"""Beyond cuBLASLt's heuristics: every algorithm configuration cuBLASLt accepts for a projection at
W1's mixed-step rows, timed. A probe: is there a configuration the heuristics never return that
beats F.linear (and the engine's tuned plan) at 256 rows?

For each shape and row count, the configurations cublasLtMatmulAlgoCheck accepts with at most
blaslt.WORKSPACE_BYTES of workspace, over:
- the algorithm ids cuBLASLt lists for bf16 in, bf16 out, float32 accumulation
  (cublasLtMatmulAlgoGetIds): each id's tiles, stages, CTA swizzling and up to 4 custom options
  (cublasLtMatmulAlgoCapGetAttribute), split-K 1-4 with each reduction scheme it supports, the
  cluster shape left to cuBLASLt;
- the ids of the heuristics' own candidates (on the H100 the nvjet kernels' id 66, not listed):
  their tiles and stages plus the heuristics', up to 8 custom options, cluster shapes 0-15, split-K
  1-2 (reduced in float32), no swizzling.
They are timed in a shuffled order for --seconds per problem (a CUDA graph of 16 launches over 8
distinct weights, so nothing comes from L2; two replays), so a budget that runs out leaves a
sample. The FINALISTS fastest, F.linear and the heuristics' candidates (without the engine's
blaslt.VARIANT_* variants) are then checked against a float32 reference (a miss above 1e-2 is
printed as such) and timed again in interleaved rounds. Prints a table per problem, writes
lt_search.json with every timed configuration.

    python bench/lt_search.py --out DIR [--rows 256] [--shapes qkv,o,gate_up,down] [--seconds 40]
"""

from __future__ import annotations

import ctypes
import itertools
import random
import statistics
import time

import microbench
import torch
from gemm_probe import DEV, LAUNCHES, chain, probe_args, problems, result, save, time_us
from inferfleet.worker.kernels import blaslt
from torch.nn import functional as F

FINALISTS = 8
ROUNDS = 5
TOLERANCE = blaslt.CHECK_TOLERANCE  # relative error against float32
# cublasLt.h: cublasLtMatmulAlgoCapAttributes_t and cublasLtMatmulAlgoConfigAttributes_t
CAP_SPLITK, CAP_REDUCTION_MASK, CAP_SWIZZLING, CAP_TILE_IDS, CAP_CUSTOM_MAX, CAP_STAGES_IDS = (
    0,
    1,
    2,
    6,
    7,
    13,
)
CFG_ID, CFG_TILE, CFG_SPLITK, CFG_REDUCTION, CFG_SWIZZLE, CFG_STAGES = 0, 1, 2, 3, 4, 6
CFG_CUSTOM, CFG_CLUSTER = blaslt._CONFIG_CUSTOM_OPTION, blaslt._CONFIG_CLUSTER_SHAPE
# reduction schemes for split-K: in place (1), in a float32 workspace (2), in the output type (4)
REDUCTIONS = (1, 2, 4)


def declare(lib: ctypes.CDLL) -> None:
    vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    algo_p = ctypes.POINTER(blaslt._Algo)
    sigs = {
        "cublasLtMatmulAlgoGetIds": [vp, i, i, i, i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i)],
        "cublasLtMatmulAlgoInit": [vp, i, i, i, i, i, i, i, algo_p],
        "cublasLtMatmulAlgoCapGetAttribute": [algo_p, i, vp, sz, ctypes.POINTER(sz)],
        "cublasLtMatmulAlgoConfigGetAttribute": [algo_p, i, vp, sz, ctypes.POINTER(sz)],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


def cap_array(lib: ctypes.CDLL, algo: blaslt._Algo, attr: int) -> list[int]:
    size = ctypes.c_size_t(0)
    if (
        lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(size))
        or not size.value
    ):
        return []
    buf = (ctypes.c_uint32 * (size.value // 4))()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, buf, size.value, ctypes.byref(size))
    return list(buf)


def cap_int(lib: ctypes.CDLL, algo: blaslt._Algo, attr: int) -> int:
    v, size = ctypes.c_int32(0), ctypes.c_size_t(0)
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4, ctypes.byref(size))
    return v.value


def config(lib: ctypes.CDLL, algo: blaslt._Algo) -> dict[str, int]:
    out = {}
    for name, attr, ctype in (("id", CFG_ID, ctypes.c_int32), ("tile", CFG_TILE, ctypes.c_uint32),
                              ("stages", CFG_STAGES, ctypes.c_uint32), ("splitk", CFG_SPLITK, ctypes.c_uint32),
                              ("reduction", CFG_REDUCTION, ctypes.c_uint32), ("swizzle", CFG_SWIZZLE, ctypes.c_uint32),
                              ("custom", CFG_CUSTOM, ctypes.c_uint32), ("cluster", CFG_CLUSTER, ctypes.c_uint16)):  # fmt: skip
        v, size = ctype(0), ctypes.c_size_t(0)
        lib.cublasLtMatmulAlgoConfigGetAttribute(
            ctypes.byref(algo), attr, ctypes.byref(v), ctypes.sizeof(v), ctypes.byref(size)
        )
        out[name] = v.value
    return out


def enumerate_configs(
    lt: blaslt.Lt, layouts: tuple[ctypes.c_void_p, ...], m: int, n: int, limit: int, heuristic: list[dict]
) -> list[tuple[dict, blaslt._Plan]]:
    """Every (id, tile, stages, split-K, reduction, swizzle, custom) cuBLASLt's check accepts, for
    the ids cuBLASLt lists and those of the `heuristic` configurations (on the H100 the nvjet
    kernels' id 66 is not listed), the latter also over cluster shapes 0-15 and split-K 1-2, with
    the heuristics' own tiles and stages added to the ones the id reports. `layouts`: the problem's
    (A, B, C) cuBLASLt layouts, m rows by n columns of output, which every plan shares."""
    extra_ids = {cfg["id"] for cfg in heuristic}
    lib = lt.lib
    bf16, f32, c32 = blaslt._CUDA_R_16BF, blaslt._CUDA_R_32F, blaslt._COMPUTE_32F
    ids = (ctypes.c_int * 512)()
    count = ctypes.c_int(0)
    blaslt._check(lib.cublasLtMatmulAlgoGetIds(lt.handle, c32, f32, bf16, bf16, bf16, bf16, 512, ids, ctypes.byref(count)), "ids")  # fmt: skip
    listed = list(ids[: count.value])
    found = []
    for algo_id in [*listed, *sorted(extra_ids - set(listed))]:
        base = blaslt._Algo()
        if lib.cublasLtMatmulAlgoInit(
            lt.handle, c32, f32, bf16, bf16, bf16, bf16, algo_id, ctypes.byref(base)
        ):
            continue
        extra = algo_id in extra_ids
        seen = [cfg for cfg in heuristic if cfg["id"] == algo_id]  # what the heuristics set, also tried
        tiles = sorted(set(cap_array(lib, base, CAP_TILE_IDS)) | {c["tile"] for c in seen}) or [0]
        stages = sorted(set(cap_array(lib, base, CAP_STAGES_IDS)) | {c["stages"] for c in seen}) or [0]
        splits = ((1, 2) if extra else (1, 2, 3, 4)) if cap_int(lib, base, CAP_SPLITK) else (1,)
        mask = cap_int(lib, base, CAP_REDUCTION_MASK)
        reductions = [r for r in REDUCTIONS if mask & r and (r == 2 or not extra)]
        swizzles = (0, 1) if cap_int(lib, base, CAP_SWIZZLING) and not extra else (0,)
        customs = range(min(cap_int(lib, base, CAP_CUSTOM_MAX), 7 if extra else 3) + 1)
        clusters = range(16) if extra else (0,)
        for tile, stage, split, swizzle, custom, cluster in itertools.product(
            tiles, stages, splits, swizzles, customs, clusters
        ):
            for reduction in [0] if split == 1 else reductions:
                values = [(CFG_TILE, ctypes.c_uint32(tile)), (CFG_STAGES, ctypes.c_uint32(stage)),
                          (CFG_SPLITK, ctypes.c_uint32(split)), (CFG_REDUCTION, ctypes.c_uint32(reduction)),
                          (CFG_SWIZZLE, ctypes.c_uint32(swizzle)), (CFG_CUSTOM, ctypes.c_uint32(custom))]  # fmt: skip
                if extra:
                    values.append((CFG_CLUSTER, ctypes.c_uint16(cluster)))
                algo = lt.configured(base, values, *layouts)
                if algo is not None:
                    found.append((config(lib, algo), blaslt._Plan(*layouts, algo, m, n)))
                    if len(found) >= limit:
                        return found
    return found


def quick_us(fn) -> float:  # type: ignore[no-untyped-def]
    """First pass: one graph of LAUNCHES launches, replayed once to warm up and twice timed."""
    graph = microbench.graph_of(chain(fn), 1)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (2 * LAUNCHES)


def main() -> None:
    ap = probe_args("o,qkv,down,gate_up")
    ap.add_argument("--limit", type=int, default=100_000, help="configurations per problem at most")
    ap.add_argument("--seconds", type=float, default=40.0, help="first-pass time per problem (a sample)")
    args = ap.parse_args()
    torch.manual_seed(0)
    F.linear(
        torch.ones(8, 8, device=DEV, dtype=torch.bfloat16), torch.ones(8, 8, device=DEV, dtype=torch.bfloat16)
    )
    lib = blaslt._library()
    assert lib is not None, "cuBLASLt did not load"
    lt = blaslt.Lt(lib, DEV)
    declare(lt.lib)
    res = result()
    for m, name, n, k, x, ws, ref in problems(args.rows, args.shapes):
        t0 = time.perf_counter()
        a, b, c = lt._layout(torch.bfloat16, k, n, k), lt._layout(torch.bfloat16, k, m, k), lt._layout(torch.bfloat16, n, m, n)  # fmt: skip
        heur = [(config(lt.lib, p.algo), p) for p in lt._candidates(torch.bfloat16, n, k, m, variants=False)]
        configs = enumerate_configs(lt, (a, b, c), m, n, args.limit, [cfg for cfg, _ in heur])
        enum_s = time.perf_counter() - t0
        first: list[tuple[float, int]] = []
        order = list(range(len(configs)))
        random.Random(0).shuffle(order)  # a budget that runs out leaves a sample of every id
        deadline = time.perf_counter() + args.seconds
        for i in order:
            if time.perf_counter() > deadline:
                break
            try:
                first.append((quick_us(lambda j, plan=configs[i][1]: lt.run(plan, x, ws[j])), i))
            except RuntimeError:
                continue
        first.sort()
        arms = {"F.linear": lambda j: F.linear(x, ws[j])}
        for h, (cfg, plan) in enumerate(heur):
            arms[f"heuristic {h} {cfg}"] = lambda j, plan=plan: lt.run(plan, x, ws[j])
        for _, i in first[:FINALISTS]:
            cfg, plan = configs[i]
            arms[f"search {cfg}"] = lambda j, plan=plan: lt.run(plan, x, ws[j])
        errs = {}
        for label, fn in arms.items():
            got = fn(0).float()
            errs[label] = ((got - ref).norm() / ref.norm()).item()
        times: dict[str, list[float]] = {label: [] for label in arms}
        for _ in range(ROUNDS):
            for label, fn in arms.items():
                times[label].append(time_us(fn, rounds=1, warmup=1))
        med = {label: statistics.median(v) for label, v in times.items()}
        res["cases"][f"{name} m{m}"] = {
            "configs": len(configs), "timed": len(first), "enumerate_s": enum_s,
            "first_pass": [(us, configs[i][0]) for us, i in first],
            "final": {label: {"us": med[label], "err": errs[label]} for label in arms},
        }  # fmt: skip
        ids = sorted({cfg["id"] for cfg, _ in configs})
        print(f"{name} m{m}: {len(configs)} configurations accepted over ids {ids}, {len(first)} timed "
              f"(enumerated in {enum_s:.1f} s)", flush=True)  # fmt: skip
        print("    first pass: " + "; ".join(f"{us:.1f} {configs[i][0]}" for us, i in first[:3]), flush=True)
        shown = sorted(arms, key=med.get)[:6]
        for label in shown + ([] if "F.linear" in shown else ["F.linear"]):
            miss = "  MISSES THE REFERENCE" if not errs[label] <= TOLERANCE else ""
            print(f"    {med[label]:7.1f} us  err {errs[label]:.1e}  {label}{miss}", flush=True)
        lt._free_layouts(a, b, c)
        if heur:  # the heuristics' candidates share layouts of their own
            lt._free_layouts(heur[0][1].a, heur[0][1].b, heur[0][1].c)
    save(args.out, "lt_search.json", res)


if __name__ == "__main__":
    main()
