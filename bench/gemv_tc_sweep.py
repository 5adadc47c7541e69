"""Decode batches of 16-256 rows through kernels/gemv.py's tensor-core path over a sweep of launches:
8-bit weights (int8, fp8 e4m3, per-row scales) against bf16 cuBLAS, widen + cuBLAS (int8) and W8A8
_scaled_mm (fp8), and bf16 weights (the LM head too) against cuBLAS, on the
Llama-3.1-8B projection shapes.

    python bench/gemv_tc_sweep.py --out DIR [--rows 16,64,128,256] [--only int8,fp8,bf16]

Every launch is checked against a float32 reference first. Weights rotate among 3 copies so each
call reads DRAM, not L2. Prints the best launch per (precision, shape, rows) last; writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from inferfleet.worker.kernels.gemv import gemv
from inferfleet.worker.quant import fp8 as qfp8
from microbench import LAUNCH_KEY, LAYER_SHAPES, SHAPES, best_launch, finish_sweep, sweep_row

LAUNCHES = [  # (block_m, block_n, block_k, num_warps, num_stages)
    dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in itertools.product((64, 128), (64, 128), (128, 256), (4, 8), (3, 4))
    if not (bm == 128 and bn == 128 and w == 4)
]

# bf16: (block_n, block_k, num_warps, num_stages) for each block_m of bf16_launches (the fourteenth
# session's sweep also cut K into 1-4 ranges, with a split-K gemv since removed: commit c7630b3)
BF16_TILES = [(64, 128, 4, 4), (64, 128, 4, 6), (128, 64, 4, 4), (128, 64, 4, 6), (128, 128, 4, 3),
              (128, 128, 8, 4), (64, 256, 4, 3), (256, 64, 8, 4), (32, 256, 4, 4)]  # fmt: skip


def bf16_launches(m: int) -> list[dict]:
    """The bf16 sweep's launches at m rows: blocks of rows from m's power of two (at least 32) up
    to two of them, every BF16_TILES tile."""
    bm0 = max(32, 1 << (m - 1).bit_length())
    return [
        dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bm in sorted({max(32, bm0 // 2), bm0})
        for bn, bk, w, st in BF16_TILES
    ]


def bf16_rows(rows: list[int], res: dict, best_rows: list) -> None:
    """bf16 weights, the decoder layer's projections and the LM head, at each of `rows`."""
    for name, (n, k) in SHAPES.items():
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(3)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ bf[0].float().t()
            cases = {
                "bf16 cuBLAS": lambda j: torch.nn.functional.linear(x, bf[j]),
                "default": lambda j: gemv(x, bf[j]),
            }
            for cfg in bf16_launches(m):
                cases[LAUNCH_KEY.format(**cfg)] = lambda j, cfg=cfg: gemv(
                    x, bf[j], fma=False, prefetch=0, **cfg
                )
            us, err = sweep_row(cases, ref, 2e-2)
            res["cases"].append({"precision": "bf16", "layer": name, "m": m, "us": us, "err": err})
            timed, best = best_launch(us, "bf16", name, m)
            gbs = n * k * 2 / timed[best] / 1e3
            print(
                f"  bf16 {name} {m}: best {best} {timed[best]:.1f} us ({gbs:.0f} GB/s of weights)", flush=True
            )
            best_rows.append(
                (
                    f"bf16 {name} {m}",
                    timed["bf16 cuBLAS"],
                    timed["bf16 cuBLAS"],
                    timed.get("default", float("nan")),  # a launch that cannot build records why
                    best,
                    timed[best],
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="16,64,128,256")
    ap.add_argument("--only", default="int8,fp8")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "cases": []}
    t0 = time.time()
    best_rows = []
    for prec in args.only.split(","):
        if prec == "bf16":
            bf16_rows([int(r) for r in args.rows.split(",")], res, best_rows)
            continue
        for name, (n, k) in LAYER_SHAPES.items():
            bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(3)]
            if prec == "int8":
                w8 = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(3)]
            else:
                w8 = [(torch.randn(n, k, device="cuda") * 64).to(torch.float8_e4m3fn) for _ in range(3)]
            scale = torch.rand(n, device="cuda") * 1e-3
            ref_w = w8[0].float() * scale[:, None]
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ ref_w.t()
                cases = {
                    "bf16 cuBLAS": lambda j: torch.nn.functional.linear(x, bf[j]),
                    "default": lambda j: gemv(x, w8[j], scale),
                }
                if prec == "int8":
                    cases["widen+cuBLAS"] = lambda j: torch.nn.functional.linear(x, w8[j].to(x.dtype)) * scale
                else:
                    cases["W8A8 _scaled_mm"] = lambda j: qfp8.fp8_scaled_mm(x, w8[j], scale, None)
                for cfg in LAUNCHES:
                    cases[LAUNCH_KEY.format(**cfg)] = lambda j, cfg=cfg: gemv(
                        x, w8[j], scale, fma=False, prefetch=0, **cfg
                    )
                us, err = sweep_row(cases, ref, 5e-2, unchecked=("bf16 cuBLAS",))
                res["cases"].append({"precision": prec, "layer": name, "m": m, "us": us, "err": err})
                timed, best = best_launch(us, prec, name, m)
                other = next(v for k2, v in timed.items() if k2 in ("widen+cuBLAS", "W8A8 _scaled_mm"))
                best_rows.append(
                    (f"{prec} {name} {m}", timed["bf16 cuBLAS"], other, timed["default"], best, timed[best])
                )
    finish_sweep(res, t0, args.out, "gemv_tc_sweep", "cuBLAS 8-bit", best_rows)


if __name__ == "__main__":
    main()
