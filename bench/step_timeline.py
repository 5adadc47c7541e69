"""Where W1's wall time goes between steps, without a profiler: GPU idle at each step boundary and
the host work around it.

    python bench/step_timeline.py --out DIR [--model-dir /tmp/llama8b] [--runs plain,gc-frozen] [--top 15]

The engine's loop launches step N, then resolves step N-1 (a one-deep pipeline). Around every
launch two CUDA events go on the compute stream: one when the launch call begins (before the host
prepares the step) and one after its last enqueue. The GPU time from step N-1's closing event to
step N's opening one is time the GPU had nothing queued while the host resolved and scheduled: it
waited for the host. Idle while the host prepares a step's inputs falls inside that step's own
event pair (`gpu_ms`), so the idle reported is a lower bound; `wait_ms`, the time the host then
waits for the step's tokens, shows the slack the host had. Host time is split into scheduling,
launching and resolving (the resolve's wait for its step's tokens apart; each step's record holds
its own resolve, which runs after the next step's launch), and Python's garbage collections are
timed through gc.callbacks. Runs, in turn, in one engine:
  plain      as gpu_bench.py runs W1
  gc-frozen  gc.freeze() after warmup (the objects alive at startup leave the collector's scans)
  gc-off     the collector disabled for the run (a bound on what collection costs)
Prints, per run, out tok/s, total idle by where it falls and the steps with the most idle; writes
DIR/step_timeline.json.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import compile_prefill, generate
from inferfleet.worker import LLM
from workloads import w1


class Timeline:
    """Wraps one engine's schedule / _launch / _resolve and records each step."""

    def __init__(self, eng) -> None:  # type: ignore[no-untyped-def]
        self.eng = eng
        self.reset()
        self._gc_t0 = 0.0
        self._orig = (eng.scheduler.schedule, eng._launch, eng._resolve)
        self.on = False

    def _gc(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms.append(
                (len(self.steps), info["generation"], (time.perf_counter() - self._gc_t0) * 1e3)
            )

    def install(self) -> None:
        schedule, launch, resolve = self._orig
        eng = self.eng
        tl = self

        def timed_schedule():  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = schedule()
            tl._cur = {"schedule_ms": (time.perf_counter() - t0) * 1e3}
            return out

        def timed_launch(sched):  # type: ignore[no-untyped-def]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            res = launch(sched)
            rec = tl._cur
            rec["launch_ms"] = (time.perf_counter() - t0) * 1e3
            b.record()
            rec["tokens"] = sched.num_tokens
            rec["seqs"] = len(sched.scheduled)
            rec["prompt_tokens"] = sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1)
            tl.events.append((a, b))
            tl.steps.append(rec)
            tl._by_step[id(res)] = rec
            return res

        def timed_resolve(step):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            if step.event is not None:
                step.event.synchronize()
            t1 = time.perf_counter()
            before = len(eng.requests)
            outs = resolve(step)
            rec = tl._by_step.pop(id(step), None)
            if rec is not None:  # None: a step launched before the timeline was reset
                rec["wait_ms"] = (t1 - t0) * 1e3
                rec["resolve_ms"] = (time.perf_counter() - t1) * 1e3
                rec["finished"] = before - len(eng.requests)
            return outs

        eng.scheduler.schedule = timed_schedule
        eng._launch = timed_launch
        eng._resolve = timed_resolve
        gc.callbacks.append(self._gc)

    def reset(self) -> None:
        self.steps: list[dict] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.gc_ms: list[tuple[int, int, float]] = []  # (step, generation, ms)
        self._by_step: dict[int, dict] = {}  # id of a launched step's _Inflight -> its record

    def summary(self, top: int) -> dict:
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(self.events):
            self.steps[i]["gpu_ms"] = a.elapsed_time(b)
            self.steps[i]["idle_before_ms"] = self.events[i - 1][1].elapsed_time(a) if i else 0.0
        for i in range(2, len(self.steps)):  # step i - 2's resolve ran just before step i's launch
            self.steps[i]["finished_prev"] = self.steps[i - 2].get("finished", 0)
        by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for s in self.steps:
            kind = ("prompt" if s["prompt_tokens"] else "decode") + (
                ", after a finish" if s.get("finished_prev") else ""
            )
            by_kind[kind][0] += 1
            by_kind[kind][1] += s["idle_before_ms"]
        idle = [s["idle_before_ms"] for s in self.steps]
        worst = sorted(range(len(self.steps)), key=lambda i: -idle[i])[:top]
        gc_by_gen: dict[int, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for _, g, ms in self.gc_ms:
            gc_by_gen[g][0] += 1
            gc_by_gen[g][1] += ms
        host = {
            k: sum(s.get(k, 0.0) for s in self.steps)
            for k in ("schedule_ms", "launch_ms", "wait_ms", "resolve_ms")
        }
        return {
            "steps": len(self.steps),
            "idle_ms": sum(idle),
            "idle_over_50us": sum(1 for x in idle if x > 0.05),
            "idle_by_kind": {k: {"steps": c, "idle_ms": t} for k, (c, t) in sorted(by_kind.items())},
            "host_ms": host,
            "gpu_ms": sum(s["gpu_ms"] for s in self.steps),
            "gc": {str(g): {"count": c, "ms": t} for g, (c, t) in sorted(gc_by_gen.items())},
            "gc_steps": sorted({s for s, _, ms in self.gc_ms if ms > 0.2}),
            "worst": [{"step": i, **_rounded(self.steps[i])} for i in worst],
        }


def _rounded(rec: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--runs", default="plain,gc-frozen,plain,gc-frozen")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    ensure_llama8b_checkpoint(args.model_dir)
    llm = LLM(
        model=args.model_dir, dtype="bfloat16", device="cuda", max_num_seqs=256, max_model_len=4096,
        max_num_batched_tokens=8192,
    )  # fmt: skip
    eng = llm.engine
    eng.warmup()
    compile_prefill(llm)
    # every run computes its prompts: a repeat of the same requests would take them from the cache
    # (the first measurement of this script left it on, and its runs after the first did)
    eng.block_manager.enable_prefix_caching = False
    tl = Timeline(eng)
    tl.install()
    runs = []
    for name in args.runs.split(","):
        gc.collect()
        if name == "gc-frozen":
            gc.freeze()
        elif name == "gc-off":
            gc.disable()
        tl.reset()
        tl.on = True
        r = generate(llm, w1(), temperature=0.6)
        tl.on = False
        gc.enable()
        gc.unfreeze()
        r.update(name=name, **tl.summary(args.top))
        runs.append(r)
        gcs = ", ".join(f"gen{g}: {v['count']} / {v['ms']:.1f} ms" for g, v in r["gc"].items())
        print(f"{name:10s} {r['output_tok_s']:8.1f} out tok/s  {r['seconds']:6.3f} s  idle {r['idle_ms']:7.1f} ms "
              f"({r['idle_over_50us']} steps > 50 us)  gpu {r['gpu_ms']:8.1f} ms  gc {gcs}", flush=True)  # fmt: skip
        print("  host ms: " + ", ".join(f"{k} {v:.0f}" for k, v in r["host_ms"].items()))
        for k, v in r["idle_by_kind"].items():
            print(f"  idle before {k:28s} {v['steps']:5d} steps {v['idle_ms']:8.1f} ms")
        for w in r["worst"][:8]:
            print("  ", json.dumps(w))
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "runs": runs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "step_timeline.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
