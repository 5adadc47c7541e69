"""bench/w1_schedule_model.py: the cost model interpolates the tuning table it is given, and the
scheduler runs it drives compute every W1 token exactly once, under both fill rules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import w1_schedule_model as model  # noqa: E402
from inferfleet.worker.kv_cache import BlockManager  # noqa: E402
from inferfleet.worker.scheduler import Scheduler  # noqa: E402
from workloads import w1  # noqa: E402

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def _tuning(us_at: dict[int, float]) -> list[dict]:
    """A table where each of the four projections takes us_at[m] / 4 at m rows (and F.linear is the
    slower choice), plus an lm_head entry that must be left out."""
    rows = [
        {"n": n, "k": k, "m": m, "linear_us": us / 4 + 1.0, "best_us": us / 4}
        for m, us in us_at.items()
        for n, k in SHAPES
    ]
    return rows + [{"n": model.LM_HEAD_N, "k": 4096, "m": 64, "linear_us": 1e6, "best_us": 1e6}]


def test_cost_interpolates_between_rows_and_extends_past_the_table() -> None:
    cost = model.projection_model(_tuning({64: 100.0, 256: 200.0}))
    layers = model.LAYERS / 1e3  # us per layer -> ms per step
    assert cost(1) == cost(64) == pytest.approx(100.0 * layers)
    assert cost(160) == pytest.approx(150.0 * layers)
    assert cost(256) == pytest.approx(200.0 * layers)
    assert cost(1256) == pytest.approx(200.0 * layers + 1000 * model.LARGE_STEP_US_PER_ROW / 1e3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_every_token_is_scheduled_once(dynamic: bool) -> None:
    n = 24
    reqs = w1()[:n]
    cls = model.DynamicTarget if dynamic else Scheduler
    sched = cls(BlockManager(4096, 16), 256, 8192, 256, True)
    rows = model.run(sched, reqs)
    # every prompt token once, and every generated token but the last fed back as a decode
    assert sum(rows) == sum(len(r.prompt) + r.max_tokens - 1 for r in reqs)
    assert len(rows) >= max(r.max_tokens for r in reqs)
    assert sched.num_unfinished == 0
