"""8-bit weights (int8, fp8 e4m3, per-row scales) at 16-256 rows: kernels/gemv.py's tensor-core
path over a sweep of launches, against bf16 cuBLAS, widen + cuBLAS (int8) and W8A8 _scaled_mm
(fp8), on the Llama-3.1-8B projection shapes.

    python bench/gemv_tc_sweep.py --out DIR [--rows 16,64,128,256] [--only int8,fp8]

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
from microbench import LAUNCH_KEY, LAYER_SHAPES, best_launch, finish_sweep, sweep_row

LAUNCHES = [  # (block_m, block_n, block_k, num_warps, num_stages)
    dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in itertools.product((64, 128), (64, 128), (128, 256), (4, 8), (3, 4))
    if not (bm == 128 and bn == 128 and w == 4)
]


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
