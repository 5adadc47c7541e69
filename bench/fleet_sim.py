"""Fleet simulation: what warm pools, balloons, pre-pull and scale-to-zero buy, in TTFT and GPU-hours.

    python bench/fleet_sim.py --out docs/ [--seed 7] [--hours 24]

Replays one seeded bursty trace (fleet_trace.py) against each policy below. Worker speed comes from
the step-time model fitted to the H100 measurements (fleet_params.py), cold starts from the measured
startup phases plus assumed node, image and probe times (FleetParams: each field says which), and
replicas from the operator's own `inferfleet.operator.autoscaler.decide`, imported.
Writes OUT/fleet_sim.json and OUT/fleet_sim.png, and prints a table last. Deterministic: no clock,
no sleeps; the same seed gives the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from fleet_cluster import Fleet, Scenario, Tick
from fleet_params import (
    CONFIGURATION,
    MEASURED,
    FleetParams,
    StepModel,
    check_points,
    fit_step_model,
    measured_points,
)
from fleet_trace import STATES, Trace, mmpp
from fleet_worker import replay_offline
from inferfleet.operator.spec import ServiceSpec, SpecError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "manifests/examples/llama-3.1-8b.yaml"  # the operator's recommended set-up
PLOTTED = ("baseline", "recommended")  # the timeline panels


def w1_lengths() -> list[tuple[int, int]]:
    return [(len(r.prompt), r.max_tokens) for r in workloads.w1()]


def step_model() -> tuple[StepModel, list[dict[str, Any]]]:
    hf = [(len(r.prompt), r.max_tokens) for r in workloads.hf_mix()]
    points = measured_points(w1_lengths(), hf)
    model = fit_step_model(points)
    return model, check_points(model, points)


@functools.cache
def _example() -> dict[str, Any]:
    """The example InferenceService, parsed once; spec_with copies what it changes."""
    return yaml.safe_load(EXAMPLE.read_text())


def spec_with(**fields: Any) -> ServiceSpec:
    """The example InferenceService with some spec fields replaced, through the operator's parser."""
    body = _example()
    spec = copy.deepcopy(body["spec"])
    prepull = fields.pop("prepull", None)
    spec.update(fields)
    if prepull is not None:
        spec["prepull"] = {**spec["prepull"], "enabled": prepull}
    spec["replicas"] = spec["minReplicas"]
    return ServiceSpec.from_body({**body, "spec": spec})


def scenarios() -> list[Scenario]:
    bare = {"minReplicas": 1, "warmPool": 0, "balloons": 0, "prepull": False}
    out = [
        Scenario("baseline", spec_with(**bare), note="minReplicas 1, nothing else"),
        Scenario("warm-1", spec_with(**{**bare, "warmPool": 1})),
        Scenario("warm-2", spec_with(**{**bare, "warmPool": 2})),
        Scenario("balloons-1", spec_with(**{**bare, "balloons": 1})),
        Scenario("balloons-2", spec_with(**{**bare, "balloons": 2})),
        Scenario("prepull", spec_with(**{**bare, "prepull": True})),
        Scenario(
            "min0-warm1",
            spec_with(**{**bare, "minReplicas": 0, "warmPool": 1}),
            note="the operator's scale-from-zero: replicas may be 0, one warm pod stays",
        ),
    ]
    try:
        spec_with(**{**bare, "minReplicas": 0})
        zero = None
    except SpecError as e:  # the CRD rule: autoscaling from 0 needs warmPool >= 1
        zero = str(e)
    assert zero is not None, "the operator now accepts minReplicas 0 with warmPool 0"
    out.append(
        Scenario(
            "zero+activator",
            dataclasses.replace(out[-1].spec, warm_pool=0),
            activator=True,
            note=f"hypothetical, not the operator (it refuses: {zero}): a buffer that reports its queue",
        )
    )
    out.append(
        Scenario(
            "recommended",
            spec_with(minReplicas=1),
            note="manifests/examples/llama-3.1-8b.yaml: warmPool 1, pre-pull, 1 balloon",
        )
    )
    return out


def summarize(fleet: Fleet, params: FleetParams) -> dict[str, Any]:
    reqs = fleet.requests
    served = [r for r in reqs if not r.dropped]
    ttft = np.array([r.ttft for r in served])
    itl = np.array([r.itl for r in served if r.out > 1])
    out_tokens = sum(r.out for r in served)
    gpu_h = fleet.gpu_hours()
    s = fleet.sc.spec
    return {
        "policy": fleet.sc.name,
        "note": fleet.sc.note,
        "min_replicas": s.min_replicas,
        "warm_pool": s.warm_pool,
        "balloons": s.balloons,
        "prepull": s.prepull_enabled,
        "activator": fleet.sc.activator,
        "requests": len(reqs),
        "dropped": len(reqs) - len(served),  # three 429s in a row (the openai client gives up)
        "dropped_pct": 100.0 * (len(reqs) - len(served)) / len(reqs),
        "retried": sum(1 for r in reqs if r.rejections),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "ttft_max_s": float(ttft.max()),
        "itl_p50_ms": float(np.nanpercentile(itl, 50) * 1e3),
        "timeouts": int((ttft > params.client_timeout_s).sum()),
        "gpu_hours": gpu_h,
        "output_tokens": out_tokens,
        "gpu_hours_per_1m_tokens": gpu_h / (out_tokens / 1e6),
        "usd_per_1m_tokens": gpu_h * params.gpu_hour_usd / (out_tokens / 1e6),
        "cold_start_median_s": float(np.median(fleet.cold_chains)) if fleet.cold_chains else None,
        **fleet.counts,
    }


def simulate(
    trace: Trace, params: FleetParams, model: StepModel, chosen: list[Scenario] | None = None
) -> dict[str, Fleet]:
    out = {}
    for sc in chosen or scenarios():
        out[sc.name] = Fleet(sc, params, model, trace.fresh(), trace.duration_s).run()
    return out


def params_doc(params: FleetParams) -> dict[str, Any]:
    def source(name: str) -> str:
        return "measured" if name in MEASURED else "configuration" if name in CONFIGURATION else "assumed"

    return {
        f.name: {"value": getattr(params, f.name), "source": source(f.name)}
        for f in dataclasses.fields(params)
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| policy | TTFT p50 s | TTFT p99 s | TTFT max s | ITL p50 ms | TTFT > 60 s | dropped (429) | GPU-h "
        "| $ / 1M out tok | cold start median s | worker starts | nodes added | preemptions |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cold = "-" if r["cold_start_median_s"] is None else f"{r['cold_start_median_s']:.0f}"
        lines.append(
            f"| {r['policy']} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.1f} | {r['ttft_max_s']:.1f} "
            f"| {r['itl_p50_ms']:.1f} | {r['timeouts']} | {r['dropped']} ({r['dropped_pct']:.1f}%) "
            f"| {r['gpu_hours']:.2f} "
            f"| {r['usd_per_1m_tokens']:.2f} | {cold} | {r['worker_starts']} | {r['nodes_provisioned']} "
            f"| {r['preemptions']} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass
class TraceRun:
    label: str
    burst_rate: float
    trace: Trace
    fleets: dict[str, Fleet]
    rows: list[dict[str, Any]]


def plot(path: Path, runs: list[TraceRun], timeline: TraceRun) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 14))
    grid = fig.add_gridspec(3, len(runs), height_ratios=[1.2, 1, 1])
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[0, i])
        for j, r in enumerate(sorted(run.rows, key=lambda r: (r["gpu_hours"], r["ttft_p99_s"]))):
            ax.scatter(r["gpu_hours"], r["ttft_p99_s"], s=40, color=f"C{i}")
            ax.annotate(
                r["policy"],
                (r["gpu_hours"], r["ttft_p99_s"]),
                textcoords="offset points",
                xytext=(5, -12 + 10 * (j % 3)),
                fontsize=8,
            )
        ax.set_yscale("log")
        ax.set_xlabel(f"GPU-hours over the {run.trace.duration_s / 3600:g} h trace")
        ax.set_ylabel("TTFT p99 of served requests (s)")
        ax.set_title(f"{run.label}: p99 TTFT vs GPU-hours", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes = [fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, :])]
    trace, fleets = timeline.trace, timeline.fleets
    lo, hi = window(trace)
    ax = axes[0]
    arrivals = np.array([r.t_arrive for r in trace.requests])
    edges = np.arange(0, trace.duration_s + 60, 60)
    counts, _ = np.histogram(arrivals, edges)
    ax.bar(edges[:-1] / 60, counts / 60, width=1.0, color="0.8", label="arrivals (req/s, 1-min bins)")
    ax.set_ylabel("req/s")
    ax2 = ax.twinx()
    for i, name in enumerate(PLOTTED):
        ticks = fleets[name].ticks
        ts = [t.t / 60 for t in ticks]
        ax2.step(
            ts, [t.replicas for t in ticks], where="post", color=f"C{i + 2}", label=f"{name}: spec.replicas"
        )
        ax2.step(
            ts,
            [t.ready for t in ticks],
            where="post",
            color=f"C{i + 2}",
            ls="--",
            label=f"{name}: ready pods",
        )
        ax2.step(
            ts, [t.nodes for t in ticks], where="post", color=f"C{i + 2}", ls=":", label=f"{name}: GPU nodes"
        )
    ax2.set_ylabel("replicas / pods / nodes")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7)
    ax.set_title(f"{timeline.label}: load and fleet, {lo / 60:.0f}-{hi / 60:.0f} min (a burst after idle)")

    ax = axes[1]
    for i, name in enumerate(PLOTTED):
        reqs = [r for r in fleets[name].requests if lo <= r.t_arrive <= hi and not r.dropped]
        ax.scatter(
            [r.t_arrive / 60 for r in reqs],
            [r.ttft for r in reqs],
            s=2,
            color=f"C{i + 2}",
            label=name,
            alpha=0.5,
        )
    ax.set_yscale("log")
    ax.set_xlabel("minutes")
    ax.set_ylabel("TTFT (s)")
    ax.legend(loc="upper left", markerscale=5)
    ax.set_title(f"{timeline.label}: time to first token of each request")
    for ax in axes:
        ax.set_xlim(lo / 60, hi / 60)
    fig.suptitle("Fleet simulation (model, not measurement): docs/fleet_sim.md", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


BURST_RATES = (25.0, 60.0)


def window(trace: Trace) -> tuple[float, float]:
    """Two hours around the first burst that follows an idle stretch (the whole trace if none)."""
    seg = trace.segments
    for a, b in itertools.pairwise(seg):
        if a[2] == "idle" and b[2] == "burst":
            return max(0.0, b[0] - 1800.0), min(trace.duration_s, b[0] + 5400.0)
    return 0.0, trace.duration_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    params = FleetParams()
    model, checks = step_model()
    w1_s, w1_steps = replay_offline(model, w1_lengths(), params.max_num_seqs, params.max_batched_tokens)
    runs = []
    for rate in BURST_RATES:
        trace = mmpp(args.seed, args.hours * 3600.0, burst_rate=rate)
        fleets = simulate(trace, params, model)
        rows = [summarize(f, params) for f in fleets.values()]
        runs.append(TraceRun(f"bursts of {rate:g} req/s", rate, trace, fleets, rows))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": f"python bench/fleet_sim.py --out {args.out} --seed {args.seed} --hours {args.hours:g}",
        "params": params_doc(params),
        "step_model": {**dataclasses.asdict(model), "checks": checks},
        "w1_replay": {
            "seconds": w1_s,
            "steps": w1_steps,
            "measured_seconds": 16.698,  # run 2 (pipelined engine)
            "measured_steps": {"run 1 (synchronous)": 1026, "run 2 (pipelined)": 1027},
        },
        "trace": {
            "kind": "mmpp",
            "seed": args.seed,
            "duration_s": runs[0].trace.duration_s,
            "states": [dataclasses.asdict(s) for s in STATES],
            "segments": runs[0].trace.segments,
        },
        "runs": [
            {
                "label": run.label,
                "burst_rate": run.burst_rate,
                "requests": len(run.trace.requests),
                "results": run.rows,
                "timeline_window_s": window(run.trace),
                "timelines": {
                    n: [list(dataclasses.astuple(t)) for t in run.fleets[n].ticks if _inside(t.t, run.trace)]
                    for n in PLOTTED
                },
                "timeline_fields": [f.name for f in dataclasses.fields(Tick)],
            }
            for run in runs
        ],
    }
    (args.out / "fleet_sim.json").write_text(json.dumps(_finite(doc), separators=(",", ":")) + "\n")
    if not args.no_plot:
        plot(args.out / "fleet_sim.png", runs, runs[-1])
    print("step model:", ", ".join(f"{k}={v:.4g}" for k, v in dataclasses.asdict(model).items()))
    for c in checks:
        print(
            f"  {c['run']:<28} measured {c['measured_s']:.4g} s  model {c['predicted_s']:.4g} s  ({c['error']:+.1%})"
        )
    print(
        f"W1 replayed through the simulated worker: {w1_s:.2f} s, {w1_steps} steps "
        "(measured: 16.70 s and 1,027 steps pipelined, 1,026 steps synchronous)"
    )
    for run in runs:
        print(f"\ntrace: seed {args.seed}, {args.hours:g} h, {run.label}, {len(run.trace.requests)} requests")
        print(table(run.rows))
    return 0


def _inside(t: float, trace: Trace) -> bool:
    lo, hi = window(trace)
    return lo <= t <= hi


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    raise SystemExit(main())
