"""plan(isvc) -> the objects one InferenceService should own. Pure: no clients, no clock.

    InferenceService <name>
    ├── Deployment <name>           workers: replicas + warmPool pods
    ├── Service <name>              ClusterIP :8000 over ready workers
    ├── PodDisruptionBudget <name>  only while more than one worker pod is wanted
    ├── DaemonSet <name>-prepull    pulls the worker (and oci:// model) image on worker nodes
    └── Deployment <name>-balloon   `balloons` pause pods, each holding one worker's resources

Every child carries a spec-hash annotation over its own desired content, and the worker pod
template carries one over the template alone: changing replicas never restarts a pod, changing
anything a pod sees does (a rollout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from inferfleet.operator import contract, crd, labels, pods
from inferfleet.operator.spec import ServiceSpec

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class ChildRef:
    api_version: str
    kind: str
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ChildRef:
        return cls(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


# Each child's identity, named once: the plan builds from these and pruning, status and the
# drift checks look children up by them.
def worker_ref(s: ServiceSpec) -> ChildRef:
    return ChildRef("apps/v1", "Deployment", s.name)


def service_ref(s: ServiceSpec) -> ChildRef:
    return ChildRef("v1", "Service", s.name)


def pdb_ref(s: ServiceSpec) -> ChildRef:
    return ChildRef("policy/v1", "PodDisruptionBudget", s.name)


def prepull_ref(s: ServiceSpec) -> ChildRef:
    return ChildRef("apps/v1", "DaemonSet", f"{s.name}-prepull")


def balloon_ref(s: ServiceSpec) -> ChildRef:
    return ChildRef("apps/v1", "Deployment", f"{s.name}-balloon")


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _metadata(s: ServiceSpec, name: str, component: str) -> Obj:
    meta: Obj = {"name": name, "namespace": s.namespace, "labels": labels.labels(s.name, component)}
    if s.uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": crd.API_VERSION,
                "kind": crd.KIND,
                "name": s.name,
                "uid": s.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def _head(s: ServiceSpec, ref: ChildRef, component: str) -> Obj:
    """apiVersion, kind and metadata of the child `ref`."""
    return {"apiVersion": ref.api_version, "kind": ref.kind, "metadata": _metadata(s, ref.name, component)}


def _with_hash(obj: Obj) -> Obj:
    obj["metadata"].setdefault("annotations", {})[labels.SPEC_HASH] = spec_hash(
        {k: v for k, v in obj.items() if k != "metadata"}
    )
    return obj


def build_worker_deployment(s: ServiceSpec) -> Obj:
    template_labels = labels.labels(s.name, labels.WORKER)
    template: Obj = {
        "metadata": {
            "labels": template_labels,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(contract.PORT),
                "prometheus.io/path": contract.METRICS_PATH,
            },
        },
        "spec": pods.worker_pod_spec(s),
    }
    template["metadata"]["annotations"][labels.SPEC_HASH] = spec_hash(template)
    return _with_hash(
        {
            **_head(s, worker_ref(s), labels.WORKER),
            "spec": {
                "replicas": s.worker_pods,
                "selector": {"matchLabels": labels.selector(s.name, labels.WORKER)},
                # Surge one pod rather than lose one: a balloon's node is where the surge lands.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "progressDeadlineSeconds": s.startup_timeout_seconds + 300,
                "revisionHistoryLimit": 5,
                "template": template,
            },
        }
    )


def build_service(s: ServiceSpec) -> Obj:
    return _with_hash(
        {
            **_head(s, service_ref(s), labels.WORKER),
            "spec": {
                "type": "ClusterIP",
                "selector": labels.selector(s.name, labels.WORKER),
                "ports": [
                    {
                        "name": contract.PORT_NAME,
                        "port": contract.PORT,
                        "targetPort": contract.PORT_NAME,
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )


def build_pdb(s: ServiceSpec) -> Obj | None:
    if s.worker_pods <= 1:
        return None  # a budget over one pod would only ever block node drains
    return _with_hash(
        {
            **_head(s, pdb_ref(s), labels.WORKER),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": labels.selector(s.name, labels.WORKER)},
                # A pod that never became ready (stuck loading) must not block a drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }
    )


def _pause_pod_spec(
    s: ServiceSpec,
    *,
    grace_seconds: int,
    resources: Obj,
    scheduling: Obj,
    priority_class: str = "",
    node_selector: Mapping[str, str] | None = None,
) -> Obj:
    """A pod of one pause container that pulls the worker image (and pins an oci:// model image)
    on its node: the pre-pull DaemonSet's and the balloons' pods."""
    volumes, mounts = pods.model_image_volume(s)
    pod: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_seconds,
    }
    if priority_class:
        pod["priorityClassName"] = priority_class
    pod.update(
        {
            "securityContext": pods.pod_security(pods.PAUSE_UID),
            **scheduling,
            "initContainers": [pods.pull_worker_image(s)],
            "containers": [pods.pause_container(resources, mounts)],
        }
    )
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if volumes:
        pod["volumes"] = volumes
    return pod


def build_prepull_daemonset(s: ServiceSpec) -> Obj | None:
    if not s.prepull_enabled:
        return None
    pod = _pause_pod_spec(
        s,
        grace_seconds=1,
        resources={"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "16Mi"}},
        scheduling=pods.scheduling_fields(s, node_affinity_only=True),
        node_selector=s.prepull_node_selector,
    )
    return _with_hash(
        {
            **_head(s, prepull_ref(s), labels.PREPULL),
            "spec": {
                "selector": {"matchLabels": labels.selector(s.name, labels.PREPULL)},
                # Pods here serve nothing: pull the new image everywhere at once.
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
                "template": {"metadata": {"labels": labels.labels(s.name, labels.PREPULL)}, "spec": pod},
            },
        }
    )


def build_balloon_deployment(s: ServiceSpec) -> Obj | None:
    if s.balloons == 0:
        return None
    pod = _pause_pod_spec(
        s,
        # Preempted balloons must vanish at once so the worker that needs the node starts.
        grace_seconds=0,
        resources=pods.worker_resources(s),
        scheduling=pods.scheduling_fields(s),
        priority_class=contract.BALLOON_PRIORITY_CLASS,
    )
    return _with_hash(
        {
            **_head(s, balloon_ref(s), labels.BALLOON),
            "spec": {
                "replicas": s.balloons,
                "selector": {"matchLabels": labels.selector(s.name, labels.BALLOON)},
                "strategy": {"type": "Recreate"},  # never hold twice the GPUs during an update
                "template": {"metadata": {"labels": labels.labels(s.name, labels.BALLOON)}, "spec": pod},
            },
        }
    )


def all_child_refs(s: ServiceSpec) -> list[ChildRef]:
    """Every child an InferenceService can own, wanted now or not (for pruning)."""
    return [worker_ref(s), service_ref(s), pdb_ref(s), prepull_ref(s), balloon_ref(s)]


def plan_spec(s: ServiceSpec) -> list[Obj]:
    built = [
        build_worker_deployment(s),
        build_service(s),
        build_pdb(s),
        build_prepull_daemonset(s),
        build_balloon_deployment(s),
    ]
    return [obj for obj in built if obj is not None]


def plan(isvc: Mapping[str, Any]) -> list[Obj]:
    """The children `isvc` should own, in apply order. Raises SpecError on bad input."""
    return plan_spec(ServiceSpec.from_body(isvc))
