"""Every Kubernetes API permission the operator uses, in one place.

`KubeClient` refuses any call that is not listed here, the kopf registry's watches are checked
against it, and tests/operator/test_operator_rbac.py requires manifests/rbac.yaml to grant
exactly this set (rule by rule, each commented "Framework:" or "Application:"). The emulator
in the integration tests enforces the manifest's rules, so a missing grant fails a test.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from inferfleet.operator import crd


@dataclasses.dataclass(frozen=True, order=True)
class Permission:
    group: str
    resource: str  # plural, or plural/subresource
    verb: str


@dataclasses.dataclass(frozen=True)
class Rule:
    layer: Literal["Framework", "Application"]
    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def permissions(self) -> set[Permission]:
        return {Permission(self.group, r, v) for r in self.resources for v in self.verbs}


RULES: tuple[Rule, ...] = (
    Rule(
        "Framework",
        "apiextensions.k8s.io",
        ("customresourcedefinitions",),
        ("list", "watch"),
        "kopf discovers the InferenceService CRD and follows its changes",
    ),
    Rule(
        "Framework",
        crd.GROUP,
        (crd.PLURAL,),
        ("list", "watch", "patch"),
        "kopf watches InferenceServices and patches its progress annotations and finalizer",
    ),
    Rule(
        "Framework",
        "",
        ("events",),
        ("create",),
        "kopf posts handler failures and the autoscaler's decisions as events",
    ),
    Rule(
        "Application",
        crd.GROUP,
        (crd.PLURAL,),
        ("get",),
        "drift handlers and the status refresher read the owning InferenceService",
    ),
    Rule(
        "Application",
        crd.GROUP,
        (f"{crd.PLURAL}/status",),
        ("patch",),
        "status: replicas, conditions, pre-pull and balloon progress, autoscaler decision",
    ),
    Rule(
        "Application",
        crd.GROUP,
        (f"{crd.PLURAL}/scale",),
        ("patch",),
        "the autoscaler writes spec.replicas through the scale subresource",
    ),
    Rule(
        "Application",
        crd.GROUP,
        (f"{crd.PLURAL}/finalizers",),
        ("update",),
        "children's owner references block the owner's deletion (blockOwnerDeletion), which "
        "OwnerReferencesPermissionEnforcement (OpenShift, hardened clusters) allows only with this",
    ),
    Rule(
        "Application",
        "apps",
        ("deployments", "daemonsets"),
        ("get", "list", "watch", "create", "patch", "delete"),
        "workers, balloons, pre-pull: server-side apply (create+patch), drift watch, pruning",
    ),
    Rule(
        "Application",
        "",
        ("services",),
        ("get", "list", "watch", "create", "patch"),
        "the workers' Service: server-side apply and drift watch (never deleted: owner GC does it)",
    ),
    Rule(
        "Application",
        "policy",
        ("poddisruptionbudgets",),
        ("get", "list", "watch", "create", "patch", "delete"),
        "the workers' PodDisruptionBudget: applied while >1 pod is wanted, pruned otherwise",
    ),
    Rule(
        "Application",
        "",
        ("pods",),
        ("list", "watch"),
        "worker readiness for status, pod addresses for the autoscaler's scrape",
    ),
)


def declared() -> set[Permission]:
    out: set[Permission] = set()
    for rule in RULES:
        out |= rule.permissions()
    return out
