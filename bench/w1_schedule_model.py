"""How much of W1's projection time the schedule could still save, by a cost model, not a GPU run.

    python bench/w1_schedule_model.py --tuning docs/bench/2026-11-27-h100-s19-ab-w1-fast-log-new-1.json
                                      [--budgets 256,320,256:384] [--dynamic]

The real scheduler (worker/scheduler.py, LLM's offline settings: longest_first, max_num_batched_tokens
8,192) runs W1's requests with no model: each step's scheduled tokens are recorded, a sampled
sequence gets a token, and a sequence at max_tokens finishes. A step's projection time is then
modelled from the GEMM tuning table that gpu_bench.py writes (`gemm_tuning`: the faster of
F.linear and the tuned cuBLASLt plan per shape and row count): the four projections' us summed
and times 32 layers, linear between tabled row counts, and 18.5 us per row above the largest
(a large prefill step's rate). Printed per setting: steps, modelled projection seconds, rows per
step by bucket; and the floor the model allows for that many steps and rows: steps times the lower
convex envelope of the cost at the mean row count (the tabled costs are not convex, 192 rows
costing more than 224 or 256, so a mix of two row counts on the envelope can beat every step at
the mean). No schedule need reach it: requests cannot start all at once, nor prompts be split
at will.

Each --budgets entry is decode_step_tokens, or decode_step_tokens:due_step_tokens (the step's
budget once a prompt is due and while nothing decodes; scheduler.py). --dynamic adds a variant whose fill target is the rows left (prompts and generations of every
unfinished request) over the steps left (the longest generation left), instead of a fixed budget.
Attention, the lm_head and the small kernels are left out: their totals do not depend on how the
rows are grouped into steps (KV read per generated token is fixed by the requests).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inferfleet.worker.kv_cache import BlockManager
from inferfleet.worker.sampling_params import SamplingParams
from inferfleet.worker.scheduler import Scheduler
from inferfleet.worker.sequence import Sequence
from workloads import Request, w1

LM_HEAD_N = 128256
LAYERS = 32
LARGE_STEP_US_PER_ROW = 18.5


def projection_model(tuning: list[dict]):  # type: ignore[no-untyped-def]
    """rows -> modelled ms of one step's projections (lm_head excluded)."""
    per_rows: dict[int, dict] = collections.defaultdict(dict)
    for g in tuning:
        if g["n"] != LM_HEAD_N:
            per_rows[g["m"]][(g["n"], g["k"])] = min(g["linear_us"], g["best_us"])
    shapes = max(len(v) for v in per_rows.values())
    ms = sorted(m for m, v in per_rows.items() if len(v) == shapes)
    table = {m: sum(per_rows[m].values()) * LAYERS / 1e3 for m in ms}

    def cost(rows: float) -> float:
        if rows <= ms[0]:
            return table[ms[0]]
        if rows >= ms[-1]:
            return table[ms[-1]] + (rows - ms[-1]) * LARGE_STEP_US_PER_ROW / 1e3
        i = bisect.bisect_left(ms, rows)
        a, b = ms[i - 1], ms[i]
        return table[a] + (table[b] - table[a]) * (rows - a) / (b - a)

    far = ms[-1] + 100_000  # the cost is linear beyond the table: one far vertex stands for it
    cost.vertices = [(1, table[ms[0]]), *((m, table[m]) for m in ms if m > 1), (far, cost(far))]  # type: ignore[attr-defined]
    return cost


def lower_hull(vertices: list[tuple[float, float]]):  # type: ignore[no-untyped-def]
    """The lower convex envelope of a piecewise-linear function given by its vertices (x ascending),
    as a function of x within their range."""
    hull: list[tuple[float, float]] = []
    for x, y in vertices:
        # drop the last vertex while it lies on or above the segment from the one before it to (x, y)
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (x - hull[-2][0]) >= (y - hull[-2][1]) * (
            hull[-1][0] - hull[-2][0]
        ):
            hull.pop()
        hull.append((x, y))
    xs = [x for x, _ in hull]

    def envelope(x: float) -> float:
        i = min(max(bisect.bisect_left(xs, x), 1), len(hull) - 1)
        (x0, y0), (x1, y1) = hull[i - 1], hull[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    return envelope


class DynamicTarget(Scheduler):
    """Fill target = rows left over steps left, recomputed every step; a prompt whose generation is
    at least the longest left is never held back (as in Scheduler)."""

    def _horizon(self) -> int | None:
        seqs = [*self.running, *self.waiting]
        if not seqs:
            return None
        left = [s.params.max_tokens - s.num_output_tokens for s in seqs]
        rows = sum(s.num_tokens - s.num_computed_tokens for s in seqs) + sum(left) - len(seqs)
        self._target = -(-rows // max(max(left), 1))
        return max(left)

    def _deferred(self, seq: Sequence, n: int, budget: int, horizon: int | None) -> int:
        if horizon is None or n <= 1 or seq.params.max_tokens - seq.num_output_tokens >= horizon:
            return n
        return max(0, min(n, self._target - (self.max_num_batched_tokens - budget)))


def run(sched: Scheduler, reqs: list[Request] | None = None) -> list[int]:
    """Rows scheduled per step for `reqs` (W1's unless given) until every request has finished."""
    for i, r in enumerate(w1() if reqs is None else reqs):
        sched.add(Sequence(str(i), r.prompt, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)))
    rows = []
    while sched.num_unfinished:
        out = sched.schedule()
        assert not out.preempted, "the model assumes W1 fits the KV pool, as on the H100"
        sampled = [s.seq for s in out.scheduled if s.samples]
        sched.advance(out)
        rows.append(out.num_tokens)
        for seq in sampled:
            seq.token_ids.append(1)
        for seq in list(sched.running):
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuning", required=True, help="a gpu_bench.py JSON with gemm_tuning")
    ap.add_argument("--budgets", default="256")
    ap.add_argument("--dynamic", action="store_true")
    args = ap.parse_args()
    cost = projection_model(json.loads(Path(args.tuning).read_text())["gemm_tuning"])
    floor = lower_hull(cost.vertices)
    cases: list[tuple[str, Scheduler]] = []
    for spec in args.budgets.split(","):  # DECODE_STEP_TOKENS[:DUE_STEP_TOKENS]
        b, *due = (int(x) for x in spec.split(":"))
        sched = Scheduler(BlockManager(60000, 16), 256, 8192, b, True, due[0] if due else None)
        cases.append((f"decode_step_tokens {spec}", sched))
    if args.dynamic:
        cases.append(("dynamic target", DynamicTarget(BlockManager(60000, 16), 256, 8192, 256, True)))
    for name, sched in cases:
        rows = run(sched)
        mean = sum(rows) / len(rows)
        buckets = collections.Counter("<=128" if r <= 128 else "129-255" if r < 256 else "256" if r == 256
                                      else "257-1024" if r <= 1024 else ">1024" for r in rows)  # fmt: skip
        print(
            f"{name:24s} steps {len(rows)}  projections {sum(map(cost, rows)) / 1e3:.3f} s modelled  "
            f"(floor at {mean:.0f} rows per step: {len(rows) * floor(mean) / 1e3:.3f} s)  "
            + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items()))
        )


if __name__ == "__main__":
    main()
