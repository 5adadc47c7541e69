"""The GEMM tuning's table for Llama-3.1-8B's shape: every (weight shape, rows) problem startup's
tuning (kernels/blaslt.py) timed, F.linear's us against the best cuBLASLt candidate's, and whether
the candidate was kept. Builds the random bf16 checkpoint (bench/checkpoint.py) unless there.

    python bench/gemm_tuning_report.py --out DIR [--model-dir /tmp/llama8b]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from checkpoint import ensure_llama8b_checkpoint
from inferfleet.worker import EngineConfig, LLMEngine
from inferfleet.worker.kernels import blaslt
from microbench import SHAPES

NAMES = {shape: name for name, shape in SHAPES.items()}  # (N, K) -> the projection's name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    args = ap.parse_args()
    ensure_llama8b_checkpoint(args.model_dir)
    t0 = time.perf_counter()
    eng = LLMEngine(
        EngineConfig(model=args.model_dir, device="cuda", dtype="bfloat16", max_num_batched_tokens=8192)
    )
    eng.warmup()  # tunes the GEMMs, then captures the graphs
    lt = blaslt.get(torch.device("cuda"))
    assert lt is not None, "no tuning ran (INFERFLEET_GEMM_TUNE=0 or no cuBLASLt)"
    rows = sorted(lt.report, key=lambda r: (NAMES.get((r["n"], r["k"]), "?"), r["m"]))
    print(
        f"GEMM tuning on {torch.cuda.get_device_name()}: {len(rows)} problems, engine up in {time.perf_counter() - t0:.1f} s"
    )
    print(f"{'shape':8} {'rows':>5} {'F.linear us':>12} {'best lt us':>11} {'gain':>6}  kept")
    for r in rows:
        best = r["best_us"]
        gain = f"{1 - best / r['linear_us']:6.1%}" if best else "     -"
        print(f"{NAMES.get((r['n'], r['k']), str((r['n'], r['k']))):8} {r['m']:5d} {r['linear_us']:12.1f} "
              f"{best or float('nan'):11.1f} {gain}  {'yes' if r['cublaslt'] else ''}")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "report": rows}
        (Path(args.out) / "gemm_tuning_report.json").write_text(json.dumps(res, indent=1))
    del eng


if __name__ == "__main__":
    main()
