"""The operator (kopf, in-process, cluster-wide, standalone) against the API-server emulator over
HTTP on loopback. The emulator enforces manifests/rbac.yaml on every operator request."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from ifo_emulator import Emulator
from ifo_support import ISVC, eventually, make_isvc, operator_config, running_operator
from inferfleet.operator import crd, labels

pytestmark = pytest.mark.asyncio

NS = "default"
CHILDREN = [
    ("apps/v1/deployments", "llm"),
    ("v1/services", "llm"),
    ("policy/v1/poddisruptionbudgets", "llm"),
    ("apps/v1/daemonsets", "llm-prepull"),
    ("apps/v1/deployments", "llm-balloon"),
]
WORKERS = labels.selector_string("llm", labels.WORKER)


def children(emu: Emulator) -> dict[tuple[str, str], dict[str, Any]]:
    found = {(r, n): emu.get(r, NS, n) for r, n in CHILDREN}
    return {k: v for k, v in found.items() if v is not None}


def full_isvc(**spec: Any) -> dict[str, Any]:
    return make_isvc(replicas=2, warmPool=1, balloons=1, prepull={"enabled": True}, **spec)


def status(emu: Emulator) -> dict[str, Any]:
    return (emu.get(ISVC, NS, "llm") or {}).get("status") or {}


def condition(emu: Emulator, ctype: str) -> dict[str, Any]:
    return next((c for c in status(emu).get("conditions") or [] if c["type"] == ctype), {})


def image_of(obj: dict[str, Any], init: bool = False) -> str:
    pod = obj["spec"]["template"]["spec"]
    return str((pod["initContainers"] if init else pod["containers"])[0]["image"])


async def test_create_makes_every_child_with_owner_references(operator: Emulator) -> None:
    isvc = operator.put(ISVC, full_isvc())
    found = await eventually(lambda: len(children(operator)) == 5 and children(operator), what="5 children")
    for obj in found.values():
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": crd.API_VERSION,
                "kind": crd.KIND,
                "name": "llm",
                "uid": isvc["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["labels"][labels.MANAGED_BY] == labels.MANAGER
    assert found["apps/v1/deployments", "llm"]["spec"]["replicas"] == 3  # replicas + warmPool
    assert found["apps/v1/deployments", "llm-balloon"]["spec"]["replicas"] == 1
    st = await eventually(lambda: status(operator).get("observedGeneration") == 1 and status(operator))
    assert st["selector"] == WORKERS
    assert st["endpoint"] == "http://llm.default.svc:8000"
    assert st["prepull"] == {"desired": 0, "ready": 0}  # no DaemonSet controller in the emulator
    assert st["balloons"]["desired"] == 1


async def test_changing_replicas_warm_pool_and_image_patches_children(operator: Emulator) -> None:
    operator.put(ISVC, full_isvc())
    await eventually(lambda: len(children(operator)) == 5, what="5 children")
    before = children(operator)
    new_image = "registry.example.com/inferfleet-worker:0.2.0"
    operator.patch(ISVC, NS, "llm", {"spec": {"replicas": 3, "warmPool": 2, "image": new_image}})

    def updated() -> bool:
        got = children(operator)
        return (
            len(got) == 5
            and got["apps/v1/deployments", "llm"]["spec"]["replicas"] == 5
            and image_of(got["apps/v1/deployments", "llm"]) == new_image
            and image_of(got["apps/v1/deployments", "llm-balloon"], init=True) == new_image
            and image_of(got["apps/v1/daemonsets", "llm-prepull"], init=True) == new_image
        )

    await eventually(updated, what="children patched")
    after = children(operator)
    for key, obj in after.items():  # patched in place: same objects, not recreated
        assert obj["metadata"]["uid"] == before[key]["metadata"]["uid"]
    # The template changed, so the workers roll; a replicas-only change would not.
    await eventually(lambda: status(operator).get("observedGeneration") == 2, what="generation 2 observed")
    pods = operator.pods_of(NS, WORKERS)
    assert len(pods) == 5 and {p["spec"]["containers"][0]["image"] for p in pods} == {new_image}
    hash_before = after["apps/v1/deployments", "llm"]["spec"]["template"]["metadata"]["annotations"]
    operator.patch(ISVC, NS, "llm", {"spec": {"replicas": 4}})
    await eventually(lambda: children(operator)["apps/v1/deployments", "llm"]["spec"]["replicas"] == 6)
    template = children(operator)["apps/v1/deployments", "llm"]["spec"]["template"]
    assert template["metadata"]["annotations"] == hash_before


async def test_unwanted_children_are_pruned(operator: Emulator) -> None:
    operator.put(ISVC, full_isvc())
    await eventually(lambda: len(children(operator)) == 5, what="5 children")
    operator.patch(
        ISVC,
        NS,
        "llm",
        {"spec": {"replicas": 1, "warmPool": 0, "balloons": 0, "prepull": {"enabled": False}}},
    )
    got = await eventually(lambda: len(children(operator)) == 2 and children(operator), what="pruning")
    assert set(got) == {("apps/v1/deployments", "llm"), ("v1/services", "llm")}


async def test_deleted_or_edited_children_are_restored(operator: Emulator) -> None:
    operator.put(ISVC, full_isvc())
    await eventually(lambda: len(children(operator)) == 5, what="5 children")
    old = children(operator)
    for resource, name in CHILDREN:
        operator.remove(resource, NS, name)
    restored = await eventually(
        lambda: len(children(operator)) == 5 and children(operator), what="restoration"
    )
    for key, obj in restored.items():
        assert obj["metadata"]["uid"] != old[key]["metadata"]["uid"]  # new objects

    # An edit (kubectl set image / scale on the Deployment) is reverted too.
    deploy = restored["apps/v1/deployments", "llm"]
    template = copy.deepcopy(deploy["spec"]["template"])
    template["spec"]["containers"][0]["image"] = "attacker.example.com/evil:1"
    operator.patch("apps/v1/deployments", NS, "llm", {"spec": {"replicas": 9, "template": template}})

    def reverted() -> bool:
        d = operator.get("apps/v1/deployments", NS, "llm") or {}
        return (
            d.get("spec", {}).get("replicas") == 3
            and image_of(d) == image_of(deploy) != "attacker.example.com/evil:1"
        )

    await eventually(reverted, what="edit reverted")


async def test_deleting_the_inference_service_leaves_nothing(operator: Emulator) -> None:
    operator.put(ISVC, full_isvc())
    await eventually(
        lambda: len(children(operator)) == 5 and operator.pods_of(NS, WORKERS), what="children and pods"
    )
    # kopf put its finalizer on (the daemon needs it); deletion waits for the operator to let go.
    assert operator.get(ISVC, NS, "llm")["metadata"]["finalizers"] == [f"{crd.GROUP}/finalizer"]
    operator.remove(ISVC, NS, "llm")

    def nothing_left() -> bool:
        owned = [
            o
            for r in (
                "apps/v1/deployments",
                "apps/v1/daemonsets",
                "v1/services",
                "policy/v1/poddisruptionbudgets",
                "v1/pods",
            )
            for o in operator.list(r, NS)
        ]
        return operator.get(ISVC, NS, "llm") is None and not owned

    await eventually(nothing_left, what="everything deleted")


async def test_conditions_go_from_progressing_to_ready(operator: Emulator) -> None:
    operator.put(ISVC, make_isvc(replicas=2))
    await eventually(lambda: len(operator.pods_of(NS, WORKERS)) == 2, what="2 worker pods")
    # Reconciling (spec not applied yet), then PodsStarting (applied, pods not ready yet).
    progressing = await eventually(
        lambda: (
            condition(operator, "Progressing").get("reason") == "PodsStarting"
            and condition(operator, "Progressing")
        )
    )
    assert progressing["status"] == "True" and progressing["lastTransitionTime"]
    assert condition(operator, "Ready")["status"] == "False"
    assert condition(operator, "Degraded")["status"] == "False"

    first, second = operator.pods_of(NS, WORKERS)
    operator.set_pod_ready(NS, first["metadata"]["name"])
    await eventually(lambda: status(operator).get("readyReplicas") == 1, what="1 ready")
    assert condition(operator, "Ready")["reason"] == "InsufficientReadyReplicas"
    operator.set_pod_ready(NS, second["metadata"]["name"])
    ready = await eventually(
        lambda: condition(operator, "Ready").get("status") == "True" and condition(operator, "Ready")
    )
    assert ready["reason"] == "ReplicasReady" and ready["lastTransitionTime"]
    done = await eventually(
        lambda: (
            condition(operator, "Progressing").get("status") == "False" and condition(operator, "Progressing")
        )
    )
    assert done["reason"] == "Stable"
    assert status(operator)["replicas"] == 2 and status(operator)["warmReplicas"] == 0

    # A crash-looping pod marks the service Degraded.
    operator.patch(
        "v1/pods",
        NS,
        first["metadata"]["name"],
        {
            "status": {
                "containerStatuses": [
                    {"name": "worker", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
                ]
            }
        },
        status=True,
    )
    degraded = await eventually(
        lambda: condition(operator, "Degraded").get("status") == "True" and condition(operator, "Degraded")
    )
    assert degraded["reason"] == "PodsFailing" and "CrashLoopBackOff" in degraded["message"]


async def test_restarting_the_operator_mid_reconcile_creates_no_duplicates(emulator: Emulator) -> None:
    # Hold the Service's apply so the operator is stopped with the reconcile handler half done:
    # the worker Deployment exists, the Service and the rest do not.
    release = asyncio.Event()
    emulator.holds["patch", "services"] = release
    async with running_operator(operator_config(emulator)):
        emulator.put(ISVC, full_isvc())
        await eventually(lambda: emulator.held, what="the Service apply in flight")
        assert set(children(emulator)) == {("apps/v1/deployments", "llm")}
    del emulator.holds["patch", "services"]
    release.set()
    async with running_operator(operator_config(emulator)):
        await eventually(lambda: len(children(emulator)) == 5, what="5 children after the restart")
        await eventually(
            lambda: status(emulator).get("observedGeneration") == 1, what="status after the restart"
        )
    for resource, name in CHILDREN:
        key = (
            (resource.split("/")[0], "v1", resource.split("/")[-1])
            if resource.count("/") == 2
            else ("", "v1", resource.split("/")[-1]),
            NS,
            name,
        )
        assert emulator.creations[key] == 1, f"{resource} {name} created {emulator.creations[key]} times"
    assert len(emulator.list("apps/v1/deployments", NS)) == 2
    assert len(emulator.pods_of(NS, WORKERS)) == 3


async def test_an_invalid_name_is_reported_not_applied(operator: Emulator) -> None:
    """A valid DNS subdomain that is no DNS-1035 label (the Service name needs one) gets past the
    CRD (see crd.py: CEL cannot afford a regex on metadata.name) and is refused by the operator."""
    operator.put(ISVC, make_isvc(name="llm.v2"))

    def degraded() -> dict[str, Any]:
        st = (operator.get(ISVC, NS, "llm.v2") or {}).get("status") or {}
        return next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})

    got = await eventually(lambda: degraded().get("status") == "True" and degraded(), what="InvalidSpec")
    assert got["reason"] == "InvalidSpec" and "metadata.name" in got["message"]
    assert operator.list("apps/v1/deployments", NS) == [] and operator.list("v1/services", NS) == []


async def test_fp8_kv_cache_on_a_cpu_worker_is_reported_not_applied(operator: Emulator) -> None:
    """engine.kvCacheDtype fp8 with resources.gpus 0 passes the CRD (each field is valid alone) and is
    refused by the operator as InvalidSpec, like the other impossible combinations."""
    operator.put(ISVC, make_isvc(engine={"kvCacheDtype": "fp8"}))
    got = await eventually(
        lambda: condition(operator, "Degraded").get("status") == "True" and condition(operator, "Degraded"),
        what="InvalidSpec",
    )
    assert got["reason"] == "InvalidSpec" and "spec.engine.kvCacheDtype" in got["message"]
    assert condition(operator, "Ready")["reason"] == "InvalidSpec"
    assert operator.list("apps/v1/deployments", NS) == [] and operator.list("v1/services", NS) == []


async def test_a_refused_apply_after_a_good_one_is_reported(operator: Emulator) -> None:
    """A spec change the API server refuses (here: the operator may no longer patch Deployments) on
    a running service: status says Degraded/ApplyFailed, and keeps following the pods after the
    periodic drift check's own re-apply has been refused too (it must not stop status writes)."""
    operator.put(ISVC, make_isvc())
    await eventually(lambda: len(operator.pods_of(NS, WORKERS)) == 1, what="a worker pod")
    await eventually(lambda: status(operator).get("observedGeneration") == 1, what="generation 1")
    rules = copy.deepcopy(operator.rbac_rules) or []
    for rule in rules:
        if "deployments" in rule.get("resources", []):
            rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
    operator.rbac_rules = rules
    operator.patch(ISVC, NS, "llm", {"spec": {"replicas": 2}})
    got = await eventually(
        lambda: condition(operator, "Degraded").get("status") == "True" and condition(operator, "Degraded"),
        what="ApplyFailed",
    )
    assert got["reason"] == "ApplyFailed" and "Forbidden" in got["message"]
    await asyncio.sleep(2.5)  # past resync_interval_s (2 s): a drift check has tried to re-apply
    assert ("patch", "apps", "deployments") in operator.denied
    (pod,) = operator.pods_of(NS, WORKERS)
    operator.set_pod_ready(NS, pod["metadata"]["name"])
    await eventually(lambda: status(operator).get("readyReplicas") == 1, what="the ready pod in status")
    assert condition(operator, "Degraded")["reason"] == "ApplyFailed"
    assert operator.get("apps/v1/deployments", NS, "llm")["spec"]["replicas"] == 1
    operator.denied.clear()  # refused on purpose (the fixture checks the operator needed no more)


async def test_quantities_the_server_rewrites_are_no_drift(operator: Emulator) -> None:
    """The API server stores quantities in canonical form (the emulator too: "0.5" comes back as
    "500m", "1.5Gi" as "1536Mi"); the drift checks must not take that for an edit and re-apply the
    workers on every resync and status event."""
    operator.put(ISVC, make_isvc(resources={"gpus": 0, "cpu": "0.5", "memory": "1.5Gi"}))
    await eventually(lambda: status(operator).get("observedGeneration") == 1, what="generation 1")
    stored = operator.get("apps/v1/deployments", NS, "llm")["spec"]["template"]["spec"]["containers"][0]
    assert stored["resources"]["requests"]["cpu"] == "500m"  # canonical, as a real API server has it

    def patches() -> int:
        return operator.audit.count(("operator", "patch", "apps", "deployments"))

    await asyncio.sleep(0.5)
    before = patches()
    await asyncio.sleep(4.5)  # two periodic drift checks (resync_interval_s 2 s), status events between
    assert patches() == before


async def test_a_child_name_taken_by_a_foreign_object_is_not_taken_over(operator: Emulator) -> None:
    """A Service named like the worker Service that this InferenceService does not control (a
    user's, or another tool's) is neither adopted nor changed: server-side apply with force would
    take it over, and garbage collection would delete it with the InferenceService. The service
    is Degraded/ApplyFailed naming it, and nothing else is applied meanwhile."""
    theirs = operator.put(
        "v1/services", {"metadata": {"name": "llm", "namespace": NS}, "spec": {"ports": [{"port": 80}]}}
    )
    operator.put(ISVC, make_isvc())
    got = await eventually(
        lambda: condition(operator, "Degraded").get("status") == "True" and condition(operator, "Degraded"),
        what="ApplyFailed",
    )
    assert (
        got["reason"] == "ApplyFailed"
        and "Service default/llm exists and is not controlled" in got["message"]
    )
    assert operator.get("v1/services", NS, "llm") == theirs
    assert operator.list("apps/v1/deployments", NS) == []
