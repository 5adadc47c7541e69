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
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(s, s.name, labels.WORKER),
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
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(s, s.name, labels.WORKER),
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
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _metadata(s, s.name, labels.WORKER),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": labels.selector(s.name, labels.WORKER)},
                # A pod that never became ready (stuck loading) must not block a drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }
    )


def build_prepull_daemonset(s: ServiceSpec) -> Obj | None:
    if not s.prepull_enabled:
        return None
    name = f"{s.name}-prepull"
    volumes, mounts = pods.model_image_volume(s)
    tiny = {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "16Mi"}}
    pod: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        "securityContext": pods.pod_security(pods.PAUSE_UID),
        **pods.scheduling_fields(s, node_affinity_only=True),
        "initContainers": [pods.pull_worker_image(s)],
        "containers": [pods.pause_container(tiny, mounts)],
    }
    if s.prepull_node_selector:
        pod["nodeSelector"] = dict(s.prepull_node_selector)
    if volumes:
        pod["volumes"] = volumes
    return _with_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": _metadata(s, name, labels.PREPULL),
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
    volumes, mounts = pods.model_image_volume(s)
    worker = pods.worker_resources(s)
    pod: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Preempted balloons must vanish at once so the worker that needs the node starts.
        "terminationGracePeriodSeconds": 0,
        "priorityClassName": contract.BALLOON_PRIORITY_CLASS,
        "securityContext": pods.pod_security(pods.PAUSE_UID),
        **pods.scheduling_fields(s),
        "initContainers": [pods.pull_worker_image(s)],
        "containers": [pods.pause_container(worker, mounts)],
    }
    if volumes:
        pod["volumes"] = volumes
    return _with_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(s, f"{s.name}-balloon", labels.BALLOON),
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
    return [
        ChildRef("apps/v1", "Deployment", s.name),
        ChildRef("v1", "Service", s.name),
        ChildRef("policy/v1", "PodDisruptionBudget", s.name),
        ChildRef("apps/v1", "DaemonSet", f"{s.name}-prepull"),
        ChildRef("apps/v1", "Deployment", f"{s.name}-balloon"),
    ]


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
