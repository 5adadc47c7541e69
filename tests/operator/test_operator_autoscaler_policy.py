"""The autoscaling policy, as a pure function: tables, traces (flapping) and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferfleet.operator.autoscaler import (
    DOWN_DELAYED,
    NO_METRICS,
    OUT_OF_BOUNDS,
    PARTIAL_METRICS,
    SCALE_DOWN,
    SCALE_UP,
    STEADY,
    Policy,
    State,
    decide,
)

POLICY = Policy(min_replicas=1, max_replicas=8, target_per_replica=16, scale_down_delay_s=300)


@pytest.mark.parametrize(
    ("load", "complete", "current", "replicas", "reason"),
    [
        (0, True, 1, 1, STEADY),  # min holds at zero load
        (16, True, 1, 1, STEADY),  # exactly one replica's worth
        (17, True, 1, 2, SCALE_UP),  # ceil: one request over means one more replica
        (100, True, 2, 7, SCALE_UP),  # ceil(100/16) = 7
        (1000, True, 2, 8, SCALE_UP),  # max holds
        (1000, True, 8, 8, STEADY),
        (40, True, 3, 3, STEADY),
        (0, True, 4, 4, DOWN_DELAYED),  # lower demand starts the delay, no change yet
        (None, False, 3, 3, NO_METRICS),  # no ready pod answered: hold
        (0, False, 4, 4, PARTIAL_METRICS),  # some pods unscraped: never down on a lower bound
        (200, False, 2, 8, SCALE_UP),  # ...but a lower bound is enough to go up
        (None, False, 12, 8, OUT_OF_BOUNDS),  # max enforced even without metrics
        (0, True, 0, 1, SCALE_UP),  # min enforced
    ],
)
def test_single_decisions(
    load: float | None, complete: bool, current: int, replicas: int, reason: str
) -> None:
    d = decide(POLICY, load, complete, current, State(), now=1000.0)
    assert (d.replicas, d.reason) == (replicas, reason)


def run(policy: Policy, trace: list[tuple[float, float]], start: int) -> list[int]:
    """Feed (time, load) samples through the policy like the daemon does; replicas after each."""
    current, state, out = start, State(), []
    for now, load in trace:
        d = decide(policy, load, True, current, state, now)
        current, state = d.replicas, d.state
        out.append(current)
    return out


def test_scale_down_only_after_the_delay_of_lower_demand() -> None:
    policy = Policy(1, 8, 10, scale_down_delay_s=30)
    trace = [(0, 50), (10, 5), (20, 5), (30, 5), (39, 5), (40, 5), (50, 5)]
    # Demand fell at t=10; the delay ends at t=40.
    assert run(policy, trace, start=5) == [5, 5, 5, 5, 5, 1, 1]


def test_scale_down_goes_to_the_highest_demand_seen_during_the_delay() -> None:
    policy = Policy(1, 8, 10, scale_down_delay_s=30)
    trace = [(0, 80), (10, 10), (20, 35), (30, 10), (40, 10)]
    assert run(policy, trace, start=8) == [8, 8, 8, 8, 4]  # peak 35 -> 4 replicas, not 1


def test_flapping_load_never_scales_down() -> None:
    """Demand that keeps coming back resets the delay every time it reaches current replicas."""
    policy = Policy(1, 8, 10, scale_down_delay_s=30)
    trace = [(float(t), 40.0 if t % 20 == 0 else 0.0) for t in range(0, 300, 10)]
    replicas = run(policy, trace, start=1)
    assert replicas[0] == 4  # up at once
    assert replicas == [4] * len(trace)  # and never down: the low stretches last 10 s < 30 s


def test_flapping_across_a_replica_boundary_is_damped() -> None:
    policy = Policy(1, 8, 10, scale_down_delay_s=60)
    trace = [(float(t), 31.0 if t % 20 == 0 else 29.0) for t in range(0, 200, 10)]  # 4 <-> 3
    replicas = run(policy, trace, start=3)
    assert replicas == [4] * len(trace)  # one scale-up, then steady: no 4,3,4,3 oscillation


def test_zero_delay_scales_down_at_once() -> None:
    policy = Policy(1, 8, 10, scale_down_delay_s=0)
    assert run(policy, [(0, 70), (1, 15)], start=1) == [7, 2]


def test_state_survives_a_restart() -> None:
    """The daemon persists (lowerSince, lowerPeak): a new process resumes the same delay."""
    policy = Policy(1, 8, 10, scale_down_delay_s=30)
    d1 = decide(policy, 5, True, 6, State(), now=100)
    assert d1.state == State(lower_since=100, lower_peak=1)
    restored = State(lower_since=d1.state.lower_since, lower_peak=d1.state.lower_peak)
    assert decide(policy, 5, True, 6, restored, now=129).replicas == 6
    assert decide(policy, 5, True, 6, restored, now=130).reason == SCALE_DOWN


def test_policy_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Policy(3, 2, 10, 0)
    with pytest.raises(ValueError):
        Policy(1, 2, 0, 0)


@settings(max_examples=300, deadline=None)
@given(
    lo=st.integers(0, 10),
    span=st.integers(0, 10),
    target=st.integers(1, 50),
    delay=st.integers(0, 100),
    start=st.integers(0, 30),
    samples=st.lists(st.tuples(st.integers(0, 30), st.one_of(st.none(), st.floats(0, 2000))), max_size=40),
)
def test_properties(
    lo: int, span: int, target: int, delay: int, start: int, samples: list[tuple[int, float | None]]
) -> None:
    policy = Policy(lo, lo + span, target, delay)
    current, state, now = start, State(), 0.0
    last_up_or_start = now
    for step, load in samples:
        now += step
        d = decide(policy, load, True, current, state, now)
        assert lo <= d.replicas <= lo + span  # min/max always hold
        if load is not None:
            want = policy.clamp(math.ceil(load / target))
            if want > current:
                assert d.replicas == want  # up at once, to exactly what is asked
            if d.replicas < policy.clamp(current):
                assert d.reason == SCALE_DOWN
                assert d.replicas >= want  # never below current demand
                assert d.state.lower_since is None
        if d.replicas > current:
            last_up_or_start = now
        if d.replicas < policy.clamp(current):
            # every scale-down is preceded by >= delay seconds without any scale-up
            assert now - last_up_or_start >= delay
        current, state = d.replicas, d.state
