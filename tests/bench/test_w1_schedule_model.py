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
from workloads import Request, w1  # noqa: E402

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def _tuning(us_at: dict[int, float], linear_faster_at: int | None = None) -> list[dict]:
    """A table where each of the four projections takes us_at[m] / 4 at m rows through the faster of
    its two routes (the tuned plan, but F.linear at `linear_faster_at` rows), plus an lm_head entry
    that must be left out."""
    rows = []
    for m, us in us_at.items():
        fast, slow = us / 4, us / 4 + 1.0
        linear, best = (fast, slow) if m == linear_faster_at else (slow, fast)
        rows += [{"n": n, "k": k, "m": m, "linear_us": linear, "best_us": best} for n, k in SHAPES]
    return rows + [{"n": model.LM_HEAD_N, "k": 4096, "m": 64, "linear_us": 1e6, "best_us": 1e6}]


def test_cost_interpolates_between_rows_and_extends_past_the_table() -> None:
    cost = model.projection_model(_tuning({64: 100.0, 256: 200.0}, linear_faster_at=256))
    layers = model.LAYERS / 1e3  # us per layer -> ms per step
    assert cost(1) == cost(64) == pytest.approx(100.0 * layers)
    assert cost(160) == pytest.approx(150.0 * layers)
    assert cost(256) == pytest.approx(200.0 * layers)
    assert cost(1256) == pytest.approx(200.0 * layers + 1000 * model.LARGE_STEP_US_PER_ROW / 1e3)


def test_floor_is_the_lower_convex_envelope() -> None:
    # 192 rows cost more than the chord from 128 to 256: the envelope passes under it (the table's
    # slopes stay below the large-step rate beyond it, so 256 is a vertex of the envelope)
    cost = model.projection_model(_tuning({128: 100.0, 192: 140.0, 256: 150.0}))
    floor = model.lower_hull(cost.vertices)
    layers = model.LAYERS / 1e3
    assert cost(192) == pytest.approx(140.0 * layers)
    assert floor(192) == pytest.approx(125.0 * layers)
    assert floor(128) == pytest.approx(cost(128)) and floor(256) == pytest.approx(cost(256))
    assert floor(64) == pytest.approx(100.0 * layers)  # flat below the table, as the cost
    assert floor(1256) == pytest.approx(cost(1256))


def test_dynamic_target_holds_prompts_back_to_rows_left_over_steps_left() -> None:
    # one long generation with a short prompt, five short generations with long prompts: rows left
    # (4 + 5 x 40 prompt tokens, 20 + 5 x 3 tokens to generate, less one per request that its
    # prompt's last step samples) over steps left (20) is ceil(233 / 20) = 12, so the first step
    # takes the long request's 4 tokens, which are never held back, and 8 of the next prompt
    reqs = [Request([7] * 4, 20)] + [Request([7] * 40, 3) for _ in range(5)]
    rows = model.run(model.DynamicTarget(BlockManager(4096, 16), 256, 8192, 256, True), reqs)
    assert rows[0] == 12
    # without a budget of its own the scheduler takes every prompt at once
    free = model.run(Scheduler(BlockManager(4096, 16), 256, 8192, None, True), reqs)
    assert free[0] == 204


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


def test_offline_due_steps_leave_equal_lengths_and_a_lone_prompt_as_they_were() -> None:
    """LLM's offline due budget (llm.OFFLINE_DUE_STEP_TOKENS) on the bench's own workloads: W2's
    equal lengths, including the 257-request count the check's first form lengthened by 13 steps,
    and TTFT's lone prompt schedule step for step as without it; W1 gets smaller steps (fewer of
    its rows in steps above 1,024)."""
    from inferfleet.worker.llm import OFFLINE_DECODE_STEP_TOKENS, OFFLINE_DUE_STEP_TOKENS
    from workloads import fixed

    def rows(reqs: list[Request], due: int | None) -> list[int]:
        sched = Scheduler(BlockManager(60000, 16), 256, 8192, OFFLINE_DECODE_STEP_TOKENS, True, due)
        return model.run(sched, reqs)

    for reqs in (fixed(2048, 128, 257), fixed(128, 128, 300), fixed(2048, 1, 1)):
        assert rows(reqs, OFFLINE_DUE_STEP_TOKENS) == rows(reqs, None)
    big = [sum(r for r in rs if r > 1024) for rs in (rows(w1(), OFFLINE_DUE_STEP_TOKENS), rows(w1(), None))]
    assert big[0] < big[1] / 2, big
