"""Kernel-level numbers behind the decode budget (Llama-3.1-8B shapes, bf16, CUDA).

cuBLAS GEMV/GEMM bandwidth for each projection at batch 1 and 256, and the paged-attention
decode kernel's KV read bandwidth. Prints one table; `python bench/microbench.py`.
"""

from __future__ import annotations

import torch
import triton
from inferfleet.worker.kernels.paged_attention import paged_attention

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
# a decoder layer's four projections (the sweeps and the 32-layer chains)
LAYER_SHAPES = {name: shape for name, shape in SHAPES.items() if name != "lm_head"}


def time_ms(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median ms per call of fn() over `reps` calls, each between two CUDA events, after `warmup`
    calls (the host's work to launch it counts where the device waits for it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[reps // 2]


def graph_of(fn, launches: int = 1) -> torch.cuda.CUDAGraph:
    """fn() called `launches` times, captured in one CUDA graph; fn runs once on a side stream
    first (Triton compiles, cuBLAS picks its kernels) so that nothing of that is captured. The graph
    holds fn, and so the tensors its closure holds: a replay's kernels read and write their
    addresses, which must not go back to the allocator while the graph lives."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.fn = fn
    return graph


def graph_us(fn, launches: int = 10, rounds: int = 5, warmup: int = 1) -> float:
    """us per fn() on the GPU: the fastest of `rounds` median timings (10 replays each) of one
    graph of `launches` calls of it."""
    graph = graph_of(fn, launches)
    return min(1000 * time_ms(graph.replay, reps=10, warmup=warmup) / launches for _ in range(rounds))


# a swept launch's name in bench/gptq_gemm_sweep.py and bench/gemv_tc_sweep.py
LAUNCH_KEY = "bm{block_m} bn{block_n} bk{block_k} w{num_warps} s{num_stages}"


def sweep_row(
    cases: dict, ref: torch.Tensor, tol: float, unchecked: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """Each case fn(j) (j: which of 3 weight copies) checked against ref by relative error (but the
    `unchecked` ones, which compute something else, e.g. bf16 cuBLAS on other weights) and timed
    over the rotating copies, so each call reads DRAM: ({label: median us}, {label: error}). A case
    that cannot build or misses `tol` records its error text instead of a time."""
    us: dict = {}
    errs: dict = {}
    for label, fn in cases.items():
        try:
            if label not in unchecked:
                errs[label] = ((fn(0).float() - ref).norm() / ref.norm()).item()
                assert errs[label] < tol, (label, errs[label])
            it = [0]

            def f(fn=fn) -> None:
                it[0] = (it[0] + 1) % 3
                fn(it[0])

            us[label] = triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median") * 1e3
        except Exception as e:  # a launch Triton cannot build (shared memory, registers)
            us[label] = f"error: {type(e).__name__}: {str(e)[:100]}"
    return us, errs


def best_launch(us: dict, *label: object) -> tuple[dict, str]:
    """The timed cases of a sweep_row result, and the fastest swept launch (LAUNCH_KEY names); prints
    `label` and the six fastest cases as the sweep goes."""
    timed = {k: v for k, v in us.items() if isinstance(v, float)}
    launches = {k: v for k, v in timed.items() if k.startswith("bm")}
    print(*label, {k: round(v, 1) for k, v in sorted(timed.items(), key=lambda kv: kv[1])[:6]}, flush=True)
    return timed, min(launches, key=launches.get)


def finish_sweep(res: dict, t0: float, out: str | None, name: str, other: str, rows: list[tuple]) -> None:
    """A sweep's end: seconds into `res`, `res` as JSON at out/name.json, and the table of rows
    (case label, bf16 cuBLAS us, `other` baseline us, default launch us, best launch, its us)."""
    import json
    import time
    from pathlib import Path

    res["seconds"] = time.time() - t0
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'case':20} {'bf16 cuBLAS':>11} {other:>15} {'default':>8}  best launch (us)")
    for label, bf_us, other_us, dflt, best, us in rows:
        print(f"{label:20} {bf_us:11.1f} {other_us:15.1f} {dflt:8.1f}  {best} ({us:.1f})")


def gemm_table() -> None:
    print(f"{'layer':10s} {'M':>5s} {'us':>9s} {'GB/s':>8s} {'TFLOP/s':>8s}")
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]  # > L2, rotate
        for m in (1, 8, 64, 256, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            i = [0]

            def f() -> None:
                i[0] = (i[0] + 1) % 3
                torch.nn.functional.linear(x, ws[i[0]])

            us = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
            gbs = (n * k * 2 + m * k * 2 + m * n * 2) / us / 1e3
            tf = 2 * m * n * k / us / 1e6
            print(f"{name:10s} {m:5d} {us:9.1f} {gbs:8.0f} {tf:8.1f}")


def attention_table() -> None:
    kvh, h, d, page = 8, 32, 128, 16
    print(f"{'batch':>5s} {'ctx':>6s} {'splits':>6s} {'us':>9s} {'KV GB/s':>8s}")
    for b, ctx, splits in [
        (1, 512, 1),
        (1, 512, 16),
        (1, 4096, 16),
        (32, 1024, 1),
        (32, 1024, 2),
        (256, 1024, 1),
        (256, 2048, 1),
    ]:
        nblk = b * (ctx // page)
        kc = torch.randn(nblk, page, kvh, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        bt = torch.randperm(nblk, device="cuda", dtype=torch.int32).view(b, ctx // page)
        qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
        sl = torch.full((b,), ctx, device="cuda", dtype=torch.int32)

        def f() -> None:
            paged_attention(q, kc, vc, out, qsl, sl, bt, 1, d**-0.5, num_splits=splits)

        us = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
        gbs = 2 * b * ctx * kvh * d * 2 / us / 1e3
        print(f"{b:5d} {ctx:6d} {splits:6d} {us:9.1f} {gbs:8.0f}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    gemm_table()
    attention_table()
