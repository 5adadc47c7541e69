"""The emulator's API-server behaviours the operator tests rely on, exercised over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from ifo_emulator import Emulator, label_matcher
from ifo_support import ISVC, make_isvc

pytestmark = pytest.mark.asyncio
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
ISVCS = "/apis/inferfleet.io/v1alpha1/namespaces/default/inferenceservices"


class Client:
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession, token: str = "admin") -> None:
        self.base = str(emu.url).rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json", **params: str
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        headers = {**self.headers, "Content-Type": ctype}
        async with self.session.request(
            method, self.base + path, data=data, headers=headers, params=params
        ) as r:
            return r.status, await r.json()


@pytest_asyncio.fixture
async def client(emulator: Emulator) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as s:
        yield Client(emulator, s)


def deployment(name: str, replicas: int = 1, **labels: str) -> dict[str, Any]:
    sel = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {**sel, **labels}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": sel},
                "spec": {"containers": [{"name": "c", "image": "i:1"}]},
            },
        },
    }


async def test_label_selectors() -> None:
    labels = {"a": "1", "b": "2"}
    assert label_matcher("a=1,b==2")(labels)
    assert not label_matcher("a!=1")(labels)
    assert label_matcher("c!=1")(labels)  # absent keys satisfy !=
    assert label_matcher("a in (1, 3),b notin (3)")(labels)
    assert label_matcher("a,!c")(labels) and not label_matcher("!a")(labels)
    assert label_matcher("")(labels)


async def test_metadata_and_generation(client: Client) -> None:
    status, created = await client.call("POST", DEPLOYMENTS, deployment("d"))
    assert status == 201
    meta = created["metadata"]
    assert (
        meta["uid"]
        and meta["creationTimestamp"]
        and meta["generation"] == 1
        and meta["namespace"] == "default"
    )
    rv = int(meta["resourceVersion"])
    _, patched = await client.call(
        "PATCH", DEPLOYMENTS + "/d", {"metadata": {"labels": {"x": "y"}}}, "application/merge-patch+json"
    )
    assert patched["metadata"]["generation"] == 1 and int(patched["metadata"]["resourceVersion"]) > rv
    _, patched = await client.call(
        "PATCH", DEPLOYMENTS + "/d", {"spec": {"replicas": 2}}, "application/merge-patch+json"
    )
    assert patched["metadata"]["generation"] == 2
    _, current = await client.call("GET", DEPLOYMENTS + "/d")  # (the toy controller wrote its status)
    _, same = await client.call(
        "PATCH", DEPLOYMENTS + "/d", {"spec": {"replicas": 2}}, "application/merge-patch+json"
    )
    assert same["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]  # a no-op write
    status, _ = await client.call("POST", DEPLOYMENTS, deployment("d"))
    assert status == 409


async def test_list_with_label_selector(client: Client) -> None:
    await client.call("POST", DEPLOYMENTS, deployment("a", tier="x"))
    await client.call("POST", DEPLOYMENTS, deployment("b", tier="y"))
    _, listed = await client.call("GET", DEPLOYMENTS, labelSelector="tier=x")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    assert listed["kind"] == "DeploymentList" and listed["metadata"]["resourceVersion"]


async def test_server_side_apply_creates_updates_and_forgets_fields(client: Client) -> None:
    obj = deployment("d")
    obj["metadata"]["namespace"] = "default"
    obj["metadata"]["annotations"] = {"keep": "1", "drop": "1"}
    params = {"fieldManager": "m", "force": "true"}
    status, created = await client.call(
        "PATCH", DEPLOYMENTS + "/d", obj, "application/apply-patch+yaml", **params
    )
    assert status == 200 and created["metadata"]["uid"]
    await client.call(
        "PATCH", DEPLOYMENTS + "/d", {"metadata": {"labels": {"other": "x"}}}, "application/merge-patch+json"
    )
    del obj["metadata"]["annotations"]["drop"]
    _, updated = await client.call("PATCH", DEPLOYMENTS + "/d", obj, "application/apply-patch+yaml", **params)
    assert updated["metadata"]["annotations"] == {"keep": "1"}  # no longer applied: removed
    assert updated["metadata"]["labels"]["other"] == "x"  # another manager's field stays
    status, _ = await client.call("PATCH", DEPLOYMENTS + "/d", obj, "application/apply-patch+yaml")
    assert status == 400  # fieldManager is required


async def test_json_patch_test_failure_is_422(client: Client) -> None:
    await client.call("POST", DEPLOYMENTS, deployment("d"))
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/metadata/labels/x", "value": "y"},
    ]
    status, body = await client.call("PATCH", DEPLOYMENTS + "/d", ops, "application/json-patch+json")
    assert status == 422 and body["kind"] == "Status"


async def test_status_and_scale_subresources(emulator: Emulator, client: Client) -> None:
    _, isvc = await client.call("POST", ISVCS, make_isvc(replicas=2))
    assert "status" not in isvc
    _, patched = await client.call(
        "PATCH",
        ISVCS + "/llm",
        {"spec": {"replicas": 3}, "status": {"replicas": 7}},
        "application/merge-patch+json",
    )
    assert patched["spec"]["replicas"] == 3 and "status" not in patched  # main resource ignores status
    _, patched = await client.call(
        "PATCH",
        ISVCS + "/llm/status",
        {"spec": {"replicas": 1}, "status": {"replicas": 2, "selector": "a=b"}},
        "application/merge-patch+json",
    )
    assert patched["spec"]["replicas"] == 3 and patched["status"]["replicas"] == 2  # status ignores spec
    assert patched["metadata"]["generation"] == 2  # status writes never bump generation
    _, scale = await client.call("GET", ISVCS + "/llm/scale")
    assert (
        scale["kind"] == "Scale"
        and scale["spec"] == {"replicas": 3}
        and scale["status"] == {"replicas": 2, "selector": "a=b"}
    )
    _, scale = await client.call(
        "PATCH", ISVCS + "/llm/scale", {"spec": {"replicas": 5}}, "application/merge-patch+json"
    )
    assert scale["spec"]["replicas"] == 5 and emulator.get(ISVC, "default", "llm")["spec"]["replicas"] == 5


async def test_finalizers_and_cascading_deletion(emulator: Emulator, client: Client) -> None:
    owner = emulator.put(
        ISVC, {**make_isvc(), "metadata": {"name": "llm", "namespace": "default", "finalizers": ["f"]}}
    )
    child = deployment("child")
    child["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "inferfleet.io/v1alpha1",
            "kind": "InferenceService",
            "name": "llm",
            "uid": owner["metadata"]["uid"],
            "controller": True,
        }
    ]
    await client.call("POST", DEPLOYMENTS, child)
    _, deleting = await client.call("DELETE", ISVCS + "/llm")
    assert deleting["metadata"]["deletionTimestamp"]  # held by its finalizer
    assert emulator.get("apps/v1/deployments", "default", "child") is not None
    await client.call(
        "PATCH", ISVCS + "/llm", {"metadata": {"finalizers": None}}, "application/merge-patch+json"
    )
    assert emulator.get(ISVC, "default", "llm") is None
    assert emulator.get("apps/v1/deployments", "default", "child") is None
    assert emulator.pods_of("default", "app=child") == []  # the toy controller's pods went too


async def test_delete_precondition(emulator: Emulator, client: Client) -> None:
    await client.call("POST", DEPLOYMENTS, deployment("d"))
    status, _ = await client.call("DELETE", DEPLOYMENTS + "/d", {"preconditions": {"uid": "wrong"}})
    assert status == 409
    status, _ = await client.call("DELETE", DEPLOYMENTS + "/d")
    assert status == 200
    status, _ = await client.call("DELETE", DEPLOYMENTS + "/d")
    assert status == 404


async def test_watch_replays_from_a_resource_version_and_times_out(client: Client) -> None:
    _, a = await client.call("POST", DEPLOYMENTS, deployment("a", tier="x"))
    rv = a["metadata"]["resourceVersion"]
    await client.call("POST", DEPLOYMENTS, deployment("b", tier="y"))
    await client.call("POST", DEPLOYMENTS, deployment("c", tier="x"))
    params = {"watch": "true", "resourceVersion": rv, "labelSelector": "tier=x", "timeoutSeconds": "1"}
    async with client.session.get(client.base + DEPLOYMENTS, params=params, headers=client.headers) as r:
        lines = [json.loads(line) async for line in r.content]  # the server ends it after timeoutSeconds
    events = [(e["type"], e["object"]["metadata"]["name"]) for e in lines]
    # After `rv` and matching the selector: the toy controller's status write on a, then c; never b.
    assert ("ADDED", "c") in events and ("ADDED", "a") not in events
    assert {name for _, name in events} == {"a", "c"}


async def test_live_watch_events(client: Client) -> None:
    params = {"watch": "true", "timeoutSeconds": "5"}
    async with client.session.get(client.base + DEPLOYMENTS, params=params, headers=client.headers) as r:
        await client.call("POST", DEPLOYMENTS, deployment("live"))
        line = await asyncio.wait_for(r.content.readline(), timeout=5)
    assert json.loads(line)["type"] == "ADDED"


async def test_rbac_is_enforced_for_the_operator_token(emulator: Emulator) -> None:
    async with aiohttp.ClientSession() as s:
        operator = Client(emulator, s, token=emulator.operator_token)
        status, body = await operator.call("GET", "/api/v1/namespaces/default/secrets")
        assert status == 403 and body["reason"] == "Forbidden"
        status, _ = await operator.call("GET", "/api/v1/namespaces/default/pods")
        assert status == 200
    assert emulator.denied == [("list", "", "secrets")]
    emulator.denied.clear()  # the fixture's teardown asserts the operator was never denied


async def test_toy_deployment_controller(emulator: Emulator, client: Client) -> None:
    await client.call("POST", DEPLOYMENTS, deployment("d", replicas=2))
    pods = emulator.pods_of("default", "app=d")
    assert len(pods) == 2 and all(p["status"] == {"phase": "Pending"} for p in pods)
    emulator.set_pod_ready("default", pods[0]["metadata"]["name"])
    assert emulator.get("apps/v1/deployments", "default", "d")["status"]["readyReplicas"] == 1
    await client.call("PATCH", DEPLOYMENTS + "/d", {"spec": {"replicas": 1}}, "application/merge-patch+json")
    (left,) = emulator.pods_of("default", "app=d")
    assert left["metadata"]["name"] == pods[0]["metadata"]["name"]  # the newest goes first
    emulator.remove("v1/pods", "default", left["metadata"]["name"])
    assert len(emulator.pods_of("default", "app=d")) == 1  # replaced, like a ReplicaSet would
