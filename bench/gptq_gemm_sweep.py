"""GPTQ 4-bit batches of 16-256 rows (decode batches of W1, short prefills): kernels/gptq_gemm.py's
tensor-core kernel over a sweep of launches, against dequantize + cuBLAS and bf16 cuBLAS, on the
Llama-3.1-8B projection shapes.

    python bench/gptq_gemm_sweep.py --out DIR [--rows 16,64,128,256]

Every launch is checked against the dequantized reference first. Weights rotate among 3 copies so
each call reads DRAM, not L2. Prints the best launches per (shape, rows) last; writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from inferfleet.worker.kernels.gptq_gemm import gptq_dequant, gptq_gemm
from inferfleet.worker.quant.gptq import pack_int32
from microbench import LAUNCH_KEY, LAYER_SHAPES, best_launch, finish_sweep, sweep_row

LAUNCHES = [  # (block_m, block_n, block_k, num_warps, num_stages)
    dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (3, 4))
    if not (bm == 128 and bn == 128 and w == 4)
] + [  # one M block for 256 rows
    dict(block_m=256, block_n=bn, block_k=bk, num_warps=8, num_stages=st)
    for bn, bk, st in ((32, 128, 4), (64, 128, 3), (64, 64, 4), (64, 128, 4), (128, 64, 3))
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="16,64,128,256")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "cases": []}
    t0 = time.time()
    best_rows = []
    for name, (n, k) in LAYER_SHAPES.items():
        g = k // 128
        q4 = [pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4, 1) for _ in range(3)]
        s4 = (torch.rand(n, g, device="cuda") * 0.01).half()
        z4 = torch.randint(1, 16, (n, g), device="cuda", dtype=torch.uint8)
        gi = (torch.arange(k, device="cuda") // 128).to(torch.int32)
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        ref_w = gptq_dequant(q4[0], s4, z4, gi, 4, 128, torch.float32)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            cases = {
                "bf16 cuBLAS": lambda j: torch.nn.functional.linear(x, bf[j]),
                "dequant+cuBLAS": lambda j: torch.nn.functional.linear(
                    x, gptq_dequant(q4[j], s4, z4, gi, 4, 128, torch.bfloat16)
                ),
                "default": lambda j: gptq_gemm(x, q4[j], s4, z4, gi, 4, 128),
            }
            for cfg in LAUNCHES:
                cases[LAUNCH_KEY.format(**cfg)] = lambda j, cfg=cfg: gptq_gemm(
                    x, q4[j], s4, z4, gi, 4, 128, split_k=1, **cfg
                )
            us, err = sweep_row(cases, ref, 2e-2, unchecked=("bf16 cuBLAS",))
            res["cases"].append({"layer": name, "m": m, "us": us, "err": err})
            timed, best = best_launch(us, name, m)
            best_rows.append(
                (
                    f"{name} {m}",
                    timed["bf16 cuBLAS"],
                    timed["dequant+cuBLAS"],
                    timed["default"],
                    best,
                    timed[best],
                )
            )
    finish_sweep(res, t0, args.out, "gptq_gemm_sweep", "dequant+cuBLAS", best_rows)


if __name__ == "__main__":
    main()
