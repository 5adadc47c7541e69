"""Acting on a plan: apply the wanted children, prune the unwanted, restore drifted ones.

Idempotent by construction: children have fixed names and are written with server-side apply,
so re-running any step (after a crash, a retry, or an operator restart mid-way) converges on
the same objects and never creates a second one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from inferfleet.operator import crd
from inferfleet.operator.kube import ApiError, KubeClient, resource_of
from inferfleet.operator.plan import ChildRef, all_child_refs, plan_spec, spec_hash
from inferfleet.operator.spec import ServiceSpec
from kubernetes.utils.quantity import parse_quantity


@dataclasses.dataclass(frozen=True)
class Applied:
    applied: tuple[ChildRef, ...]
    pruned: tuple[ChildRef, ...]


# keys whose values (or, for requests/limits, whose map's values) are resource quantities, which
# the API server stores in canonical form: "0.5" comes back as "500m", "1024Mi" as "1Gi"
_QUANTITY_KEYS = frozenset({"requests", "limits", "sizeLimit"})


def quantity(value: Any) -> Decimal | None:
    """The amount a Kubernetes resource quantity ("500m", "1.5Gi", 8, "1e3") stands for; None
    for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def is_subset(want: Any, have: Any, *, quantities: bool = False) -> bool:
    """Whether `have` contains `want`: extra keys in `have` are server defaults, not drift.

    Lists must match in length and element by element (the plan's lists are complete).
    Resource quantities (container requests/limits, emptyDir sizeLimit) compare by amount, as the
    API server rewrites them in canonical form.
    """
    if isinstance(want, Mapping):
        # a requests/limits map passes `quantities` on to its values
        return isinstance(have, Mapping) and all(
            k in have and is_subset(v, have[k], quantities=quantities or k in _QUANTITY_KEYS)
            for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have))
        )
    if want == have:
        return True
    return quantities and (q := quantity(want)) is not None and q == quantity(have)


def essence(obj: Mapping[str, Any]) -> str:
    """A hash of what a user or controller can change in `obj`, status and bookkeeping excluded."""
    noise = ("resourceVersion", "managedFields", "generation")
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in noise}
    return spec_hash({**{k: v for k, v in obj.items() if k not in ("status", "metadata")}, "metadata": meta})


def owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return uid is not None and any(r.get("uid") == uid and r.get("controller") for r in refs)


def owner_name(obj: Mapping[str, Any]) -> str | None:
    """The InferenceService controlling `obj`, from its controller owner reference."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == crd.KIND and ref.get("apiVersion") == crd.API_VERSION and ref.get("controller"):
            return str(ref.get("name"))
    return None


class NotOurs(ApiError):
    """A child's name is taken by an object this InferenceService does not control. Server-side
    apply with force would take it over (and garbage collection would later delete it with the
    InferenceService), so it is left alone and reported until someone renames or deletes it."""

    def __init__(self, want: Mapping[str, Any]) -> None:
        ref, namespace = ChildRef.of(want), want["metadata"]["namespace"]
        super().__init__(
            409,
            "AlreadyExists",
            f"{ref.kind} {namespace}/{ref.name} exists and is not controlled by this InferenceService: "
            "delete or rename it",
        )

    @property
    def retryable(self) -> bool:
        return False  # a person has to act: retried at the slow pace


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def claim(want: Mapping[str, Any], have: Mapping[str, Any] | None) -> None:
    """Refuse (NotOurs) to apply the planned child `want` over a live object that its owner (the
    controller in want's owner references) does not control."""
    uid = _controller_uid(want)
    if have is not None and uid is not None and not owned_by(have, uid):
        raise NotOurs(want)


async def apply_children(kube: KubeClient, s: ServiceSpec) -> Applied:
    desired = plan_spec(s)
    live = await read_children(kube, s.namespace, desired, known={})
    for obj in desired:
        claim(obj, live[ChildRef.of(obj)])
    for obj in desired:
        await kube.apply(obj)
    wanted = {ChildRef.of(obj) for obj in desired}
    pruned = [ref for ref in all_child_refs(s) if ref not in wanted and await prune(kube, s, ref)]
    return Applied(tuple(sorted(wanted)), tuple(pruned))


async def prune(kube: KubeClient, s: ServiceSpec, ref: ChildRef) -> bool:
    live = await read_child(kube, s.namespace, ref)
    if live is None or not owned_by(live, s.uid):
        return False  # gone already, or someone else's object that happens to share the name
    resource = resource_of(ref.api_version, ref.kind)
    return await kube.delete(resource, s.namespace, ref.name, uid=live["metadata"].get("uid"))


async def restore_one(kube: KubeClient, want: Mapping[str, Any], have: Mapping[str, Any] | None) -> bool:
    """Re-apply the wanted child `want` if its live copy `have` is missing (None) or no longer
    contains it; returns whether it did."""
    if have is not None and is_subset(want, have):
        return False
    claim(want, have)
    await kube.apply(want)
    return True


async def restore_drifted(
    kube: KubeClient,
    desired: Sequence[Mapping[str, Any]],
    live: Mapping[ChildRef, Mapping[str, Any] | None],
) -> list[ChildRef]:
    """Re-apply each child of `desired` (the plan) that is missing from `live` (absent or None) or
    no longer contains it."""
    restored: list[ChildRef] = []
    for obj in desired:
        ref = ChildRef.of(obj)
        if await restore_one(kube, obj, live.get(ref)):
            restored.append(ref)
    return restored


async def read_child(kube: KubeClient, namespace: str, ref: ChildRef) -> dict[str, Any] | None:
    return await kube.get(resource_of(ref.api_version, ref.kind), namespace, ref.name)


async def read_children(
    kube: KubeClient,
    namespace: str,
    desired: Sequence[Mapping[str, Any]],
    known: Mapping[ChildRef, Mapping[str, Any] | None],
) -> dict[ChildRef, Mapping[str, Any] | None]:
    """The live copy of each child of `desired` (None: missing), all read before anything is
    applied. Children in `known`, already read, are taken from there rather than read again."""
    out: dict[ChildRef, Mapping[str, Any] | None] = {}
    for obj in desired:
        ref = ChildRef.of(obj)
        out[ref] = known[ref] if ref in known else await read_child(kube, namespace, ref)
    return out
