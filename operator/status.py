"""status = f(spec, observed children, previous status, now). Pure.

Conditions (each with reason, message and lastTransitionTime, kept while the status holds):

    Ready        True  when ready worker pods >= the demand replicas (at least one): spec.replicas,
                       within [minReplicas, maxReplicas] while the autoscaler owns it
    Progressing  True  while the spec is not applied yet, pods run an old template,
                       or the pod count is not yet demand replicas + warmPool ready pods
    Degraded     True  when applying failed or a worker pod is failing
                       (crash loop, image pull, bad config)

Counts follow "demand first": the first demand-replicas ready pods serve demand, the rest are warm.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from inferfleet.operator import contract, labels
from inferfleet.operator.spec import ServiceSpec

Obj = dict[str, Any]

FAILING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclasses.dataclass(frozen=True)
class Observed:
    pods: Sequence[Mapping[str, Any]]  # worker pods (by label)
    prepull: Mapping[str, Any] | None  # the DaemonSet, if it exists
    balloon: Mapping[str, Any] | None  # the balloon Deployment, if it exists


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def is_ready(pod: Mapping[str, Any]) -> bool:
    if is_terminating(pod):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def failing_reason(pod: Mapping[str, Any]) -> str | None:
    st = pod.get("status") or {}
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason in FAILING_REASONS:
            return f"{cs.get('name', '?')}: {reason}"
    return None


def condition(
    ctype: str,
    ok: bool,
    reason: str,
    message: str,
    previous: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
    generation: int,
) -> Obj:
    status = "True" if ok else "False"
    since = rfc3339(now)
    for old in previous:
        if old.get("type") == ctype and old.get("status") == status and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def invalid_status(error: str, previous: Mapping[str, Any], now: datetime.datetime, generation: int) -> Obj:
    """The status of an InferenceService whose spec the operator cannot use: its conditions only,
    each with reason InvalidSpec and `error` as the message; every other field keeps its value."""
    prev = list(previous.get("conditions") or [])
    return {
        "conditions": [
            condition("Ready", False, "InvalidSpec", error, prev, now, generation),
            condition("Progressing", False, "InvalidSpec", error, prev, now, generation),
            condition("Degraded", True, "InvalidSpec", error, prev, now, generation),
        ]
    }


def build_status(
    s: ServiceSpec,
    previous: Mapping[str, Any],
    observed: Observed,
    *,
    template_hash: str,
    observed_generation: int | None,
    apply_error: str | None,
    autoscaler: Mapping[str, Any] | None,
    now: datetime.datetime,
) -> Obj:
    """The whole status; keys set to None are removed by the merge patch that writes it."""
    pods = [p for p in observed.pods if not is_terminating(p)]
    ready = sum(1 for p in pods if is_ready(p))
    outdated = sum(
        1
        for p in pods
        if ((p.get("metadata") or {}).get("annotations") or {}).get(labels.SPEC_HASH) != template_hash
    )
    failing = sorted({r for p in pods if (r := failing_reason(p))})
    gen = observed_generation if observed_generation is not None else previous.get("observedGeneration")
    wanted = s.worker_pods
    counts = f"{ready}/{wanted} worker pods ready"

    if wanted == 0:
        ready_c = (False, "ScaledToZero", "replicas and warmPool are 0")
    elif ready >= max(1, s.demand_replicas):
        ready_c = (True, "ReplicasReady", counts)
    elif ready == 0:
        ready_c = (False, "NoReadyReplicas", counts)
    else:
        ready_c = (False, "InsufficientReadyReplicas", counts)

    if gen != s.generation:
        prog_c = (True, "Reconciling", f"generation {s.generation} not applied yet")
    elif outdated:
        prog_c = (True, "RollingUpdate", f"{outdated} pods run an older template")
    elif ready < wanted:
        prog_c = (True, "PodsStarting", counts)
    elif len(pods) > wanted:
        prog_c = (True, "ScalingDown", f"{len(pods)} pods, {wanted} wanted")
    else:
        prog_c = (False, "Stable", counts)

    if apply_error:
        deg_c = (True, "ApplyFailed", apply_error)
    elif failing:
        deg_c = (True, "PodsFailing", "; ".join(failing))
    else:
        deg_c = (False, "AsExpected", "")

    prev_conditions = list(previous.get("conditions") or [])
    conditions = [
        condition(t, ok, reason, msg, prev_conditions, now, s.generation)
        for t, (ok, reason, msg) in (("Ready", ready_c), ("Progressing", prog_c), ("Degraded", deg_c))
    ]
    prepull = None
    if s.prepull_enabled:
        ds = (observed.prepull or {}).get("status") or {}
        prepull = {
            "desired": int(ds.get("desiredNumberScheduled") or 0),
            "ready": int(ds.get("numberReady") or 0),
        }
    balloons = None
    if s.balloons:
        bs = (observed.balloon or {}).get("status") or {}
        balloons = {"desired": s.balloons, "ready": int(bs.get("readyReplicas") or 0)}
    return {
        "observedGeneration": gen,
        "replicas": min(len(pods), s.demand_replicas),
        "readyReplicas": ready,
        "warmReplicas": max(0, min(s.warm_pool, ready - s.demand_replicas)),
        "selector": labels.selector_string(s.name, labels.WORKER),
        "endpoint": f"http://{s.name}.{s.namespace}.svc:{contract.PORT}",
        "prepull": prepull,
        "balloons": balloons,
        "conditions": conditions,
        "autoscaler": dict(autoscaler) if autoscaler is not None else previous.get("autoscaler"),
    }


def ready_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in pods if is_ready(p)]
