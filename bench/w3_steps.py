"""W3's decode steps one by one: the distribution of step times and how much of each step the host
spends busy (not waiting for the device), per precision, with Python's garbage collector as the
engine leaves it and frozen after warm-up (`gc.freeze()`, what --gc-freeze compares).

    python bench/w3_steps.py --out $OUT [--methods gptq-lm-head,fp8] [--reps 3]

Same engines and W3 request as bench/quant_bench.py (batch 1, 128 in / 256 out, greedy). A step's
wall time is `LLMEngine.step()`'s, for the calls that return tokens 2..256 (calls 0 and 1 belong to
the first token: gpu_bench.decode_latency; call 1's times are reported apart); its host-busy time is that minus the time `step()` spends blocked
on the previous step's device event (`_resolve`), so a step whose host work outlasts the device
shows a host-busy time near its wall time. Prints a table last; writes w3_steps.json into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import compile_prefill
from inferfleet.worker import SamplingParams
from quant_bench import add_model_args, build_llm, ensure_checkpoints, model_dir_for
from workloads import random_prompt


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(llm: Any, reps: int, freeze: bool) -> dict[str, Any]:
    eng = llm.engine
    waited = 0.0
    resolve = eng._resolve

    def timed_resolve(step: Any) -> Any:  # time blocked on the device event, inside step()
        nonlocal waited
        if step.event is not None:
            t = time.perf_counter()
            step.event.synchronize()
            waited += time.perf_counter() - t
        return resolve(step)

    eng._resolve = timed_resolve
    if freeze:
        gc.collect()
        gc.freeze()
    rng = random.Random(3)
    walls: list[float] = []
    busy: list[float] = []
    means = []
    call1: list[float] = []
    try:
        for rep in range(reps):
            eng.add_request(
                f"w3s-{rep}",
                params=SamplingParams(max_tokens=256, ignore_eos=True),
                prompt_token_ids=random_prompt(rng, 128),
            )
            call = 0
            rep_walls = []
            while eng.has_unfinished_requests():
                waited = 0.0
                t0 = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t0
                call += 1  # the 0-based index of this call is call - 1
                if call == 2:  # call 1: launched the first decode, waited for the prefill's token
                    call1.append(dt * 1e3)
                if call <= 2:  # call 0 launched the prefill
                    continue
                rep_walls.append(dt * 1e3)
                busy.append((dt - waited) * 1e3)
            walls += rep_walls
            means.append(statistics.mean(rep_walls))
    finally:
        eng._resolve = resolve
        if freeze:
            gc.unfreeze()
    return {
        "best_rep_mean_ms": min(means),
        "mean_ms": statistics.mean(walls),
        "median_ms": statistics.median(walls),
        "p90_ms": pct(walls, 0.9),
        "p99_ms": pct(walls, 0.99),
        "max_ms": max(walls),
        "host_busy_median_ms": statistics.median(busy),
        "host_busy_p90_ms": pct(busy, 0.9),
        "steps_over_median_plus_0.2ms": sum(w > statistics.median(walls) + 0.2 for w in walls),
        "steps": len(walls),
        "call1_ms": call1,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    add_model_args(ap, "gptq-lm-head,fp8")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    methods = args.methods.split(",")
    ensure_llama8b_checkpoint(args.model_dir)
    ensure_checkpoints(methods, args)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                              "methods": {}}  # fmt: skip
    for m in methods:
        llm = build_llm(m, model_dir_for(m, args))
        # as quant_bench does before W3 (the seventh session's JSON files,
        # 2026-11-26-h100-s7-w3-steps-*, were measured without this)
        compile_prefill(llm)
        result["methods"][m] = {
            "gc as is": run(llm, args.reps, freeze=False),
            "gc frozen": run(llm, args.reps, freeze=True),
            "gc as is, again": run(llm, args.reps, freeze=False),
        }
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "w3_steps.json").write_text(json.dumps(result, indent=1))
    cols = ("best_rep_mean_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms", "host_busy_median_ms",
            "host_busy_p90_ms", "steps_over_median_plus_0.2ms")  # fmt: skip
    print(f"\n=== W3 decode steps, {result['device']}, {result['date']} (ms)")
    print(f"{'method / gc':34s}" + "".join(f"{c[:14]:>15s}" for c in cols))
    for m, r in result["methods"].items():
        for mode, v in r.items():
            print(f"{m + ' / ' + mode:34s}" + "".join(f"{v[c]:15.3f}" for c in cols))


if __name__ == "__main__":
    main()
