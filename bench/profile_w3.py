"""Where a W3 decode step's time goes: a kernel timeline of batch-1 decode steps per precision.

    python bench/profile_w3.py --out $OUT [--methods bf16,fp8,gptq] [--steps 32]
    python bench/profile_w3.py --out $OUT --workload w1 [--w1-scale 1.0] [--methods bf16]
    python bench/profile_w3.py --layers-from docs/bench/...-profile-w3-*.json   (no GPU)

For each precision it builds the engine as bench/quant_bench.py does (Llama-3.1-8B shape, random
weights; gptq = round-to-nearest 4-bit g128 in the GPTQ layout), starts one 128-token request and
records `--steps` decode steps (CUDA graph replays, as served) with torch.profiler. Kernels of one
step overlap under programmatic dependent launch, so summed kernel durations overstate the step;
instead each kernel is charged the wall time it adds to the step's timeline: its end minus the
latest end of the kernels that started before it (never negative). What no kernel covers is
charged to "gaps" (idle GPU between kernels). A W3 run also splits one decoder layer the same way,
position by position from one attention launch to the next (`per_layer`; --layers-from prints it
for a saved run). A step runs from one LM head to the next (the
engine keeps the GPU busy across steps). Classes: projections (weight-streaming kernels), the LM
head, attention (with its split-KV merge), the small kernels by name, and copies (memcpy/memset:
the step's inputs staged host-to-device, the sampled ids back; recorded since the fourth
session's run, whose table counted them under gaps).

--workload w1 profiles a whole W1 run instead (steps of every shape, so no per-step split): the
same accounting over the run's GPU timeline, by class and for the 25 kernels charged most
(cuBLAS GEMMs count as projections), with the run's output rate. Prints a table last; --out writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import compile_prefill, generate
from inferfleet.worker import SamplingParams
from quant_bench import add_model_args, build_llm, ensure_checkpoints, model_dir_for
from workloads import random_prompt, scaled, w1

PROJ = ("gemv", "gptq", "row4", "gemm", "cutlass", "sm90_xmma", "nvjet")  # weight-streaming kernels


def classify(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "copies"  # the step's host-to-device inputs, the sampled ids back to the host
    if any(p in n for p in PROJ):
        return "projection"
    for key, cls in (
        ("attention", "attention"),
        ("merge", "attention"),
        ("norm", "norm"),
        ("rope", "rotary+kv write"),
        ("rotary", "rotary+kv write"),
        ("silu", "silu"),
        ("quant", "act quant"),
    ):
        if key in n:
            return cls
    return "other: " + name[:48]


def _lm_heads(kernels: list[tuple[str, float, float]]) -> list[int]:
    """Indices of the LM head launches: the longest weight-streaming kernels by far (1 GB in bf16)."""
    proj = [d for n, _, d in kernels if classify(n) == "projection"]
    return [i for i, (n, _, d) in enumerate(kernels) if classify(n) == "projection" and d >= 0.5 * max(proj)]


def split_steps(kernels: list[tuple[str, float, float]]) -> list[list[tuple[str, float, float]]]:
    """kernels (name, start us, duration us) sorted by start -> one list per decode step, from its
    LM head to the next step's LM head included (the engine runs steps back to back, so idle time
    cannot separate them)."""
    return [kernels[a : b + 1] for a, b in itertools.pairwise(_lm_heads(kernels))]


def step_priors(kernels: list[tuple[str, float, float]]) -> list[float | None]:
    """For each step of split_steps(kernels): the latest end among the kernels before its LM head
    (the previous step's last kernels may still run when it starts, under PDL), or None."""
    ends = [None, *itertools.accumulate((t + d for _, t, d in kernels), max)]  # ends[i]: before kernel i
    return [ends[a] for a in _lm_heads(kernels)[:-1]]


def _extensions(
    kernels: list[tuple[str, float, float]], prior_end: float | None = None
) -> list[tuple[float, float]]:
    """Per kernel (by start): (the idle gap before it, the wall time it adds to the timeline: its
    end minus the latest end before it, never negative). `prior_end`: the latest end of what ran
    before the first kernel, which is charged only past it (and no gap before it)."""
    out = []
    covered = kernels[0][1] if prior_end is None else max(prior_end, kernels[0][1])
    for _name, start, dur in kernels:
        out.append((max(0.0, start - covered), max(0.0, start + dur - max(start, covered))))
        covered = max(covered, start + dur)
    return out


def _charge(
    kernels: list[tuple[str, float, float]], label: Callable[[int, str], str], prior_end: float | None = None
) -> tuple[dict[str, float], float]:
    """Charge each kernel, under label(index, name), the wall time it adds to the timeline; "gaps"
    is what no kernel covers. Returns the charges and the timeline's end."""
    out: dict[str, float] = defaultdict(float)
    ext = _extensions(kernels, prior_end)
    for i, ((name, _, _), (gap, added)) in enumerate(zip(kernels, ext, strict=True)):
        out["gaps"] += gap
        out[label(i, name)] += added
    return out, max(start + dur for _, start, dur in kernels)


def per_layer(
    kernels: list[tuple[str, float, float]], anchor: str = "_paged_attention"
) -> list[dict[str, Any]]:
    """A decoder layer's kernels in order, from one attention launch (`anchor`) to the next: for
    each position, its kernel name and the median over every complete layer of the wall time it
    adds and of the idle gap before it (the accounting of `charge`). A layer is complete when the
    next anchor follows it at the usual distance (the last layer of a step runs into the LM head)."""
    ext = _extensions(kernels)
    starts = [i for i, (n, _, _) in enumerate(kernels) if n.startswith(anchor)]
    spans = [b - a for a, b in itertools.pairwise(starts)]
    if not spans:
        return []
    size = statistics.mode(spans)
    layers = [a for a, b in itertools.pairwise(starts) if b - a == size]
    return [
        {
            "kernel": kernels[layers[0] + p][0],
            "us": statistics.median(ext[a + p][1] for a in layers),
            "gap_us": statistics.median(ext[a + p][0] for a in layers),
            "layers": len(layers),
        }
        for p in range(size)
    ]


def step_boundary(steps: list[list[tuple[str, float, float]]]) -> list[dict[str, Any]]:
    """What runs between two steps' decoder layers: from the LM head to the first layer's attention
    (sampling, the sampled ids' copy back, the next step's input copies and feed, the embedding,
    the first norm and QKV), position by position as in per_layer, median over the steps whose
    boundary has the most common kernel sequence."""
    segs = []
    for s in steps:
        first_attn = next((i for i, (n, _, _) in enumerate(s) if i and classify(n) == "attention"), None)
        if first_attn is not None:
            segs.append((s[:first_attn], _extensions(s[:first_attn])))
    if not segs:
        return []
    shape = statistics.mode(tuple(n for n, _, _ in seg) for seg, _ in segs)
    same = [ext for seg, ext in segs if tuple(n for n, _, _ in seg) == shape]
    return [
        {
            "kernel": name,
            "us": statistics.median(ext[p][1] for ext in same),
            "gap_us": statistics.median(ext[p][0] for ext in same),
            "layers": len(same),
        }
        for p, name in enumerate(shape)
    ]


def charge(step: list[tuple[str, float, float]], prior_end: float | None = None) -> dict[str, float]:
    """Wall time (us) each class adds to the step's timeline, plus the gaps no kernel covers; the
    step runs from its LM head (first element) to the next one's start (last element). The LM head
    is charged only past `prior_end` (step_priors: the previous step's last projection may still
    run when it starts; before the tenth session's profiles that overlap, ~20 us, was charged to
    both steps)."""
    out, covered = _charge(step[:-1], lambda i, name: "lm_head" if i == 0 else classify(name), prior_end)
    out["gaps"] += max(0.0, step[-1][1] - covered)
    out["step"] = step[-1][1] - step[0][1]
    return out


def charge_window(kernels: list[tuple[str, float, float]], top: int = 25) -> dict[str, Any]:
    """A whole run (W1: steps of every shape): ms per class and for the `top` kernel names, and the
    window's wall time, under the same accounting."""
    by_class, end = _charge(kernels, lambda i, name: classify(name))
    by_name, _ = _charge(kernels, lambda i, name: name[:80])
    names = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    # where the gaps are: by the classes of the kernels on either side, and by length (a graph's
    # kernel boundaries are ~1 us; a step boundary that waits on the host is longer)
    by_pair: dict[str, float] = defaultdict(float)
    by_length: dict[str, list[float]] = {k: [0, 0.0] for k in ("<2 us", "2-10 us", "10-100 us", ">=100 us")}
    ext = _extensions(kernels)
    for i in range(1, len(kernels)):
        gap = ext[i][0]
        if gap <= 0:
            continue
        by_pair[f"{classify(kernels[i - 1][0])} -> {classify(kernels[i][0])}"] += gap
        length = "<2 us" if gap < 2 else "2-10 us" if gap < 10 else "10-100 us" if gap < 100 else ">=100 us"
        by_length[length][0] += 1
        by_length[length][1] += gap
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1])[:top]
    return {
        "window_ms": (end - kernels[0][1]) / 1e3,
        "ms_by_class": {k: v / 1e3 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "ms_by_kernel": {k: v / 1e3 for k, v in names},
        "gap_ms_by_neighbours": {k: v / 1e3 for k, v in pairs},
        "gaps_by_length": {k: {"count": c, "ms": t / 1e3} for k, (c, t) in by_length.items()},
    }


def _kernels(prof: torch.profiler.profile) -> list[tuple[str, float, float]]:
    """Every GPU activity (kernels, memcpy, memset) as (name, start us, duration us), by start."""
    return sorted(
        (
            (e.name, float(e.time_range.start), float(e.time_range.elapsed_us()))
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0
        ),
        key=lambda k: k[1],
    )


def profile_method(method: str, model_dir: str, steps: int) -> dict:
    llm = build_llm(method, model_dir)
    eng = llm.engine
    rng = random.Random(3)
    eng.add_request("p", params=SamplingParams(max_tokens=steps + 40, ignore_eos=True),
                    prompt_token_ids=random_prompt(rng, 128))  # fmt: skip
    for _ in range(20):  # prefill and the first decode steps, unprofiled
        eng.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    kernels = _kernels(prof)
    steps_found = split_steps(kernels)
    charged = [charge(s, prior) for s, prior in zip(steps_found, step_priors(kernels), strict=True)]
    keys = sorted(
        {k for c in charged for k in c}, key=lambda k: -statistics.median(c.get(k, 0) for c in charged)
    )
    res = {
        "steps_profiled": len(charged),
        "kernels_per_step": statistics.median(len(s) - 1 for s in steps_found),
        "median_us": {k: statistics.median(c.get(k, 0.0) for c in charged) for k in keys},
        "kernel_names": sorted({n for n, _, _ in kernels}),
        "per_layer_us": per_layer(kernels),
        "boundary_us": step_boundary(steps_found),
        # the first 340 kernels (one step and a few more): name, start (us from the first), duration
        "raw": [(n[:40], round(t - kernels[0][1], 2), round(d, 2)) for n, t, d in kernels[:340]],
    }
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_w1(method: str, model_dir: str, scale: float) -> dict:
    """W1 (bench/workloads.py) under the profiler: where the run's GPU time goes, by class and kernel."""
    llm = build_llm(method, model_dir)
    compile_prefill(llm)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run = generate(llm, scaled(w1(), scale), temperature=0.6)
    res = {"w1": run, **charge_window(_kernels(prof))}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "bf16,fp8,gptq")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--workload", choices=("w3", "w1"), default="w3")
    ap.add_argument("--w1-scale", type=float, default=1.0, help="W1: fraction of its 256 requests")
    ap.add_argument(
        "--layers-from", default=None, help="a W3 JSON of this script: its per-layer table, no GPU"
    )
    args = ap.parse_args()
    if args.layers_from:
        print_layers(json.loads(Path(args.layers_from).read_text()))
        return
    t0 = time.time()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"), "workload": args.workload, "methods": {}}  # fmt: skip
    ensure_llama8b_checkpoint(args.model_dir)
    methods = args.methods.split(",")
    ensure_checkpoints(methods, args)
    for m in methods:
        if args.workload == "w1":
            result["methods"][m] = profile_w1(m, model_dir_for(m, args), args.w1_scale)
        else:
            result["methods"][m] = profile_method(m, model_dir_for(m, args), args.steps)
        print(m, json.dumps(result["methods"][m].get("median_us", result["methods"][m])), flush=True)
    result["seconds"] = time.time() - t0
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / f"profile_{args.workload}.json"
        out.write_text(json.dumps(result, separators=(",", ":")))
    if args.workload == "w1":
        print(f"\nW1 ({args.w1_scale:g} of the requests), ms of GPU timeline by class ({result['device']})")
        for m in methods:
            r = result["methods"][m]
            print(f"{m}: {r['w1'].get('output_tok_s', 0):.0f} out tok/s, window {r['window_ms']:.0f} ms")
            for k, v in r["ms_by_class"].items():
                print(f"  {k[:48]:48s} {v:10.1f}")
            print("  gaps by the kernels either side:")
            for k, v in r["gap_ms_by_neighbours"].items():
                print(f"    {k[:70]:70s} {v:8.1f}")
            print(
                "  gaps by length: "
                + ", ".join(f"{k} {c['count']} / {c['ms']:.1f} ms" for k, c in r["gaps_by_length"].items())
            )
        return
    keys = sorted({k for r in result["methods"].values() for k in r["median_us"]},
                  key=lambda k: -max(r["median_us"].get(k, 0) for r in result["methods"].values()))  # fmt: skip
    print(f"\nW3 decode step, median us per step ({result['device']}, {result['date']})")
    print(f"{'':28s}" + "".join(f"{m:>10s}" for m in methods))
    for k in keys:
        print(
            f"{k[:28]:28s}" + "".join(f"{result['methods'][m]['median_us'].get(k, 0):10.1f}" for m in methods)
        )
    print_layers(result)


def print_layers(result: dict) -> None:
    """The per-layer table of each method of a W3 result (from its full trace, or from the first
    kernels recorded under "raw" in runs made before per_layer_us existed)."""
    for m, r in result["methods"].items():
        rows = r.get("per_layer_us") or per_layer([tuple(k) for k in r["raw"]])
        if rows:
            print(f"\n{m}: one decoder layer, median us over {rows[0]['layers']} complete layers")
            _print_rows(rows, "layer")
        rows = r.get("boundary_us")
        if rows:
            print(f"\n{m}: LM head to the first attention, median us over {rows[0]['layers']} steps")
            _print_rows(rows, "boundary")


def _print_rows(rows: list[dict[str, Any]], total: str) -> None:
    for row in rows:
        print(f"  {row['kernel'][:40]:40s} {row['us']:8.2f}  (gap before {row['gap_us']:.2f})")
    print(f"  {total:40s} {sum(row['us'] + row['gap_us'] for row in rows):8.2f}")


if __name__ == "__main__":
    main()
