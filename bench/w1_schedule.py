"""W1 under the scheduler's offline settings, one engine, several settings in turn.

    python bench/w1_schedule.py --out DIR [--settings fifo:8192,longest_first:512] [--host-times]

Each setting is ADMISSION:DECODE_STEP_TOKENS[:DUE_STEP_TOKENS] (`fifo` or `longest_first`; 0 for
no decode budget of its own; the due budget, EngineConfig.due_step_tokens, only when given: the
settings are set on the scheduler directly, so `fifo:B:D`, which EngineConfig refuses, runs too,
and its first steps cap the prompts queued ahead of the longest). Prefix caching is off, so every
run computes its prompts (a second run of the same requests with it on takes its prompts from the
cache: 13.2 s against 16.2 s on the H100). With
--host-times, the host time spent launching steps (`runner.execute`) is reported for steps with
prompt chunks and for decode-only steps. Prints a line per run; writes DIR/w1_schedule.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import compile_prefill, generate
from inferfleet.worker import LLM
from workloads import w1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--settings", default="fifo:0,longest_first:512")
    ap.add_argument("--host-times", action="store_true")
    args = ap.parse_args()
    ensure_llama8b_checkpoint(args.model_dir)
    llm = LLM(
        model=args.model_dir, dtype="bfloat16", device="cuda", max_model_len=4096, max_num_batched_tokens=8192
    )
    eng = llm.engine
    eng.warmup()
    compile_prefill(llm)
    eng.block_manager.enable_prefix_caching = False
    host: collections.Counter = collections.Counter()
    if args.host_times:
        execute = eng.runner.execute

        def timed(out, feed=None):  # type: ignore[no-untyped-def]
            kind = "prompt" if any(s.num_new_tokens > 1 for s in out.scheduled) else "decode"
            t0 = time.perf_counter()
            res = execute(out, feed)
            host[f"{kind} s"] += time.perf_counter() - t0
            host[f"{kind} steps"] += 1
            return res

        eng.runner.execute = timed  # type: ignore[method-assign]
    runs = []
    for setting in args.settings.split(","):
        admission, budget, *due = setting.split(":")
        eng.scheduler.longest_first = admission == "longest_first"
        eng.scheduler.decode_step_tokens = int(budget) or None
        eng.scheduler.due_step_tokens = int(due[0]) if due else None
        host.clear()
        r = generate(llm, w1(), temperature=0.6)
        r.update(
            admission=admission,
            decode_step_tokens=eng.scheduler.decode_step_tokens,
            due_step_tokens=eng.scheduler.due_step_tokens,
            host=dict(host),
        )
        runs.append(r)
        print(
            f"{setting:18s} {r['output_tok_s']:8.1f} out tok/s  {r['seconds']:6.2f} s  {r['steps']} steps  {dict(host)}"
        )
    out = {
        "device": __import__("torch").cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "w1_schedule.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
