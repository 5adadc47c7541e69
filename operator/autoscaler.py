"""The autoscaling policy: a pure function of (policy, observed load, replicas, state, now).

    desired = clamp(ceil(load / targetInFlightPerReplica), minReplicas, maxReplicas)

    desired >= current             -> `desired` now (scale up at once); forget any low stretch
    desired <  current, metrics ok -> remember when demand first fell below `current` and the
                                      highest `desired` seen since; once that stretch has lasted
                                      scaleDownDelaySeconds, go to that highest value
    no metrics                     -> hold (and still enforce min/max)
    partial metrics                -> the load is a lower bound: up is safe, down is not

A flapping load (below, above, below...) keeps resetting the stretch, so replicas never go down
while demand keeps coming back. The state is two numbers, small enough to persist in the
InferenceService's status so an operator restart does not restart the delay. A fleet simulator
can import `decide` and replay traces through it without Kubernetes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: the fleet simulator imports this module without the operator's
    from inferfleet.operator.spec import ServiceSpec

# Decision reasons (stable strings: they appear in status and events).
SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"
STEADY = "Steady"
DOWN_DELAYED = "ScaleDownDelayed"
NO_METRICS = "NoMetrics"
PARTIAL_METRICS = "PartialMetrics"
OUT_OF_BOUNDS = "OutOfBounds"


@dataclasses.dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_per_replica: float
    scale_down_delay_s: float

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self}")
        if self.target_per_replica <= 0 or self.scale_down_delay_s < 0:
            raise ValueError(f"need target_per_replica > 0 and scale_down_delay_s >= 0, got {self}")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


def policy_for(s: ServiceSpec) -> Policy:
    """The policy an InferenceService's spec sets (replica bounds and spec.autoscaling)."""
    return Policy(
        min_replicas=s.min_replicas,
        max_replicas=s.max_replicas,
        target_per_replica=float(s.autoscaling.target_in_flight_per_replica),
        scale_down_delay_s=float(s.autoscaling.scale_down_delay_seconds),
    )


@dataclasses.dataclass(frozen=True)
class State:
    """A stretch of lower demand: when it began (seconds) and the highest desired count since."""

    lower_since: float | None = None
    lower_peak: int = 0


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: int  # what spec.replicas should be now
    desired: int | None  # what the load alone asks for (clamped); None without metrics
    load: float | None
    reason: str
    state: State

    def changes(self, current: int) -> bool:
        return self.replicas != current


def decide(
    policy: Policy, load: float | None, complete: bool, current: int, state: State, now: float
) -> Decision:
    """One autoscaler step. `load` is waiting + running summed over the ready pods scraped;
    `complete` is False when some ready pod could not be scraped."""
    bounded = policy.clamp(current)
    if load is None:
        reason = OUT_OF_BOUNDS if bounded != current else NO_METRICS
        return Decision(bounded, None, None, reason, state)
    desired = policy.clamp(math.ceil(max(load, 0.0) / policy.target_per_replica))
    if desired >= bounded:
        if desired > current:
            reason = SCALE_UP
        elif bounded != current:
            reason = OUT_OF_BOUNDS
        else:
            reason = STEADY
        return Decision(desired, desired, load, reason, State())
    if not complete:
        reason = OUT_OF_BOUNDS if bounded != current else PARTIAL_METRICS
        return Decision(bounded, desired, load, reason, state)
    if state.lower_since is None:
        since, peak = now, desired
    else:
        since, peak = state.lower_since, max(state.lower_peak, desired)
    if now - since >= policy.scale_down_delay_s:
        return Decision(peak, desired, load, SCALE_DOWN if peak < current else STEADY, State())
    reason = OUT_OF_BOUNDS if bounded != current else DOWN_DELAYED
    return Decision(bounded, desired, load, reason, State(since, peak))
