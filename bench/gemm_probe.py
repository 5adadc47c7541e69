"""Can a Triton GEMM beat cuBLAS at W1's mixed-step shape (256 rows) on the H100? A probe, not an
engine path: for each Llama-3.1-8B projection it times F.linear (cuBLAS's pick) against a plain
Triton tile GEMM over a sweep of tiles, and for gate/up also a dual GEMM whose epilogue writes
silu(gate) * up, against F.linear followed by the engine's SiLU-and-mul kernel.

Each launch is checked against a float32 reference on one weight before it is timed; timings are
replays of one CUDA graph of 16 launches over 8 distinct weights (nothing served from L2).

    python bench/gemm_probe.py --out DIR [--rows 256] [--shapes qkv,o,gate_up,down]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import microbench
import torch
import triton
import triton.language as tl
from inferfleet.worker.kernels import LAUNCH_OPTIONS
from inferfleet.worker.kernels.elementwise import silu_and_mul
from torch.nn import functional as F

DEV = torch.device("cuda")
WEIGHTS = 8
LAUNCHES = 16


@triton.jit
def _gemm_kernel(
    a_ptr, w_ptr, c_ptr, M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DUAL: tl.constexpr, HALF,
):  # fmt: skip
    # C [M, N] = A [M, K] @ W [N, K]^T, both K-contiguous; programs along M first, so the row tiles
    # that share a weight tile run together and the weight comes from DRAM once. DUAL: W is
    # [gate; up] with HALF rows each, and C [M, HALF] = silu(A Wg^T) * (A Wu^T)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    pm = pid % tiles_m
    pn = pid // tiles_m
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    w = w_ptr + rn[:, None] * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if DUAL:
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        wu = w + HALF * K
    for _k in range(0, K, BK):
        at = tl.load(a, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(at, tl.trans(tl.load(w)), acc)
        if DUAL:
            acc_u = tl.dot(at, tl.trans(tl.load(wu)), acc_u)
            wu += BK
        a += BK
        w += BK
    if DUAL:
        acc = acc * tl.sigmoid(acc) * acc_u
        out_n = HALF
    else:
        out_n = N
    c = c_ptr + rm[:, None] * out_n + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] < M)


def triton_gemm(x, w, out, bm, bn, bk, warps, stages, dual=False):
    m, k = x.shape
    n = w.shape[0] // 2 if dual else w.shape[0]
    grid = (triton.cdiv(m, bm) * (n // bn),)
    _gemm_kernel[grid](
        x, w, out, m, n, k, BM=bm, BN=bn, BK=bk, DUAL=dual, HALF=n,
        num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


def chain(fn):  # type: ignore[no-untyped-def]
    """One graph's work: fn(j) LAUNCHES times, j cycling over the WEIGHTS weights."""

    def launches() -> None:
        for i in range(LAUNCHES):
            fn(i % WEIGHTS)

    return launches


def time_us(fn, rounds: int = 3, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    """us per launch of fn(j) over the weights, LAUNCHES of them in one graph."""
    return microbench.graph_us(chain(fn), launches=1, rounds=rounds, warmup=warmup) / LAUNCHES


def problems(
    rows: str, shapes: str
) -> Iterator[tuple[int, str, int, int, torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    """For each row count and Llama-3.1-8B projection of the comma lists: (m, name, n, k, x [m, k],
    WEIGHTS distinct weights [n, k], the float32 reference of x @ ws[0]^T); the weights are let go
    before the next."""
    for m in (int(r) for r in rows.split(",")):
        for name in shapes.split(","):
            n, k = microbench.LAYER_SHAPES[name]
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * k**-0.5 for _ in range(WEIGHTS)]
            yield m, name, n, k, x, ws, F.linear(x.float(), ws[0].float())
            ws.clear()
            torch.cuda.empty_cache()


def checked_us(fn, ref: torch.Tensor, tol: float, reset=None) -> float | str:  # type: ignore[no-untyped-def]
    """fn(j) (j: which weight) checked on weight 0 against ref by relative error, then timed over
    the weights (time_us); the error's text instead where it misses tol or does not build (out of
    shared memory or registers: not a candidate). `reset()`, if given, runs before the check (a
    poisoned output, so that an element the launch fails to write cannot pass)."""
    try:
        if reset is not None:
            reset()
        got = fn(0)
        err = ((got.float() - ref).norm() / ref.norm()).item()
        return time_us(fn) if err <= tol else f"error {err:.2e}"  # NaN fails
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:80]}"


def probe_args(shapes: str) -> argparse.ArgumentParser:
    """The probes' command line: --out, --rows (comma list), --shapes (comma list, default `shapes`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="256")
    ap.add_argument("--shapes", default=shapes)
    return ap


def result(**extra: object) -> dict:
    """A probe's JSON: the device, the date, `extra`, and its cases (filled in by the probe)."""
    return {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), **extra, "cases": {}}


def save(out: str | None, name: str, res: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(res, indent=1))


def main() -> None:
    args = probe_args("qkv,o,gate_up,down").parse_args()
    torch.manual_seed(0)
    res = result()
    configs = [
        c
        for c in itertools.product((64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4, 5))
        if c[0] * c[2] + c[1] * c[2] <= 128 * 128 + 256 * 64  # shared memory per stage, roughly
    ]
    for m, name, n, k, x, ws, ref in problems(args.rows, args.shapes):
        flops = 2 * m * n * k
        row: dict = {"cublas": time_us(lambda j: F.linear(x, ws[j]))}
        out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
        for c in configs:
            if n % c[1] == 0:
                row["bm{} bn{} bk{} w{} s{}".format(*c)] = checked_us(
                    lambda j, c=c: triton_gemm(x, ws[j], out, *c), ref, 1e-2
                )
        if name == "gate_up":
            half = n // 2
            g, u = ref[:, :half], ref[:, half:]
            ref2 = g * torch.sigmoid(g) * u
            y = torch.empty(m, half, device=DEV, dtype=torch.bfloat16)
            row["cublas + silu_and_mul"] = time_us(lambda j: silu_and_mul(F.linear(x, ws[j])))
            for c in configs:
                if half % c[1] == 0 and c[1] <= 128:
                    row["dual bm{} bn{} bk{} w{} s{}".format(*c)] = checked_us(
                        lambda j, c=c: triton_gemm(x, ws[j], y, *c, dual=True), ref2, 2e-2
                    )
        res["cases"][f"{name} m{m}"] = row
        timed = {kk: v for kk, v in row.items() if isinstance(v, float)}
        best = sorted((v, kk) for kk, v in timed.items() if kk.startswith("bm"))[:3]
        print(
            f"{name} m{m}: cublas {row['cublas']:.1f} us ({flops / row['cublas'] / 1e6:.0f} TFLOP/s)",
            flush=True,
        )
        for v, kk in best:
            print(f"    {kk:28s} {v:8.1f} us ({flops / v / 1e6:.0f} TFLOP/s)", flush=True)
        if name == "gate_up":
            dual = sorted((v, kk) for kk, v in timed.items() if kk.startswith("dual"))[:3]
            print(f"    cublas + silu_and_mul        {row['cublas + silu_and_mul']:8.1f} us", flush=True)
            for v, kk in dual:
                print(f"    {kk:28s} {v:8.1f} us ({flops / v / 1e6:.0f} TFLOP/s)", flush=True)
    save(args.out, "gemm_probe.json", res)


if __name__ == "__main__":
    main()
