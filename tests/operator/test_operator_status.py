"""build_status as a pure function: counts, conditions with reasons, transition times."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from ifo_support import make_isvc
from inferfleet.operator import labels
from inferfleet.operator.plan import build_worker_deployment
from inferfleet.operator.spec import ServiceSpec
from inferfleet.operator.status import Observed, build_status

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def spec(**kw: Any) -> ServiceSpec:
    return ServiceSpec.from_body(make_isvc(**kw))


def template_hash(s: ServiceSpec) -> str:
    return str(build_worker_deployment(s)["spec"]["template"]["metadata"]["annotations"][labels.SPEC_HASH])


def pod(
    s: ServiceSpec, ready: bool, *, old: bool = False, waiting: str | None = None, deleting: bool = False
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "p",
        "annotations": {labels.SPEC_HASH: "old" if old else template_hash(s)},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    st: dict[str, Any] = {"conditions": [{"type": "Ready", "status": str(ready)}]}
    if waiting:
        st["containerStatuses"] = [{"name": "worker", "state": {"waiting": {"reason": waiting}}}]
    return {"metadata": meta, "status": st}


def status(
    s: ServiceSpec,
    pods: list[dict[str, Any]],
    previous: dict[str, Any] | None = None,
    now: datetime.datetime = T0,
    **kw: Any,
) -> dict[str, Any]:
    args: dict[str, Any] = {"observed_generation": s.generation, "apply_error": None, "autoscaler": None}
    args.update(kw)
    return build_status(
        s, previous or {}, Observed(pods, None, None), template_hash=template_hash(s), now=now, **args
    )


def cond(st: dict[str, Any], ctype: str) -> tuple[str, str]:
    c = next(c for c in st["conditions"] if c["type"] == ctype)
    return c["status"], c["reason"]


@pytest.mark.parametrize(
    ("kw", "ready_flags", "extra", "expect"),
    [
        # replicas 2, warm 1: three pods wanted
        (
            {"replicas": 2, "warmPool": 1},
            [],
            {},
            {"Ready": ("False", "NoReadyReplicas"), "Progressing": ("True", "PodsStarting")},
        ),
        (
            {"replicas": 2, "warmPool": 1},
            [True, False, False],
            {},
            {"Ready": ("False", "InsufficientReadyReplicas")},
        ),
        (
            {"replicas": 2, "warmPool": 1},
            [True, True, False],
            {},
            {"Ready": ("True", "ReplicasReady"), "Progressing": ("True", "PodsStarting")},
        ),
        (
            {"replicas": 2, "warmPool": 1},
            [True, True, True],
            {},
            {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "Stable")},
        ),
        ({"replicas": 1}, [True, True], {}, {"Progressing": ("True", "ScalingDown")}),
        ({"replicas": 1}, [True], {"observed_generation": 0}, {"Progressing": ("True", "Reconciling")}),
        ({"replicas": 1}, [True], {"apply_error": "403 Forbidden"}, {"Degraded": ("True", "ApplyFailed")}),
        (
            {"replicas": 0, "minReplicas": 0},
            [],
            {},
            {"Ready": ("False", "ScaledToZero"), "Progressing": ("False", "Stable")},
        ),
    ],
)
def test_conditions(
    kw: dict[str, Any], ready_flags: list[bool], extra: dict[str, Any], expect: dict[str, tuple[str, str]]
) -> None:
    s = spec(**kw)
    st = status(s, [pod(s, r) for r in ready_flags], **extra)
    for ctype, want in expect.items():
        assert cond(st, ctype) == want, ctype
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Progressing", "Degraded"]


def test_counts_are_demand_first() -> None:
    s = spec(replicas=2, warmPool=2, maxReplicas=4)
    st = status(s, [pod(s, True), pod(s, True), pod(s, True), pod(s, False)])
    assert (st["replicas"], st["readyReplicas"], st["warmReplicas"]) == (2, 3, 1)
    st = status(s, [pod(s, True)])
    assert (st["replicas"], st["readyReplicas"], st["warmReplicas"]) == (1, 1, 0)


def test_rollout_and_failures() -> None:
    s = spec(replicas=2)
    st = status(s, [pod(s, True, old=True), pod(s, True)])
    assert cond(st, "Progressing") == ("True", "RollingUpdate")
    st = status(s, [pod(s, False, waiting="ImagePullBackOff"), pod(s, True)])
    assert cond(st, "Degraded") == ("True", "PodsFailing")
    msg = next(c for c in st["conditions"] if c["type"] == "Degraded")["message"]
    assert msg == "worker: ImagePullBackOff"
    st = status(s, [pod(s, True), pod(s, True), pod(s, True, deleting=True)])  # terminating: not counted
    assert st["readyReplicas"] == 2 and cond(st, "Progressing") == ("False", "Stable")


def test_last_transition_time_changes_only_on_transitions() -> None:
    s = spec(replicas=1)
    first = status(s, [pod(s, False)], now=T0)
    same = status(s, [pod(s, False)], previous=first, now=T1)
    flipped = status(s, [pod(s, True)], previous=same, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in same["conditions"]}
    assert times == {c["type"]: c["lastTransitionTime"] for c in first["conditions"]}
    assert times["Ready"] == "2026-01-01T00:00:00Z"
    ready = next(c for c in flipped["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    degraded = next(c for c in flipped["conditions"] if c["type"] == "Degraded")
    assert degraded["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # unchanged: False all along


def test_optional_parts() -> None:
    s = spec(balloons=2, prepull={"enabled": True})
    ds = {"status": {"desiredNumberScheduled": 4, "numberReady": 3}}
    balloon = {"status": {"readyReplicas": 1}}
    st = build_status(
        s,
        {},
        Observed([], ds, balloon),
        template_hash="x",
        observed_generation=1,
        apply_error=None,
        autoscaler=None,
        now=T0,
    )
    assert st["prepull"] == {"desired": 4, "ready": 3} and st["balloons"] == {"desired": 2, "ready": 1}
    off = spec(prepull={"enabled": False})
    st = status(off, [], previous={"autoscaler": {"reason": "Steady"}})
    assert st["prepull"] is None and st["balloons"] is None  # None: removed by the merge patch
    assert st["autoscaler"] == {"reason": "Steady"}  # the last decision is kept
