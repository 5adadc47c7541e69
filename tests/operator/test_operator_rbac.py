"""manifests/rbac.yaml grants exactly what the operator uses: the declared list (operator/rbac.py),
the kopf registry's watches, the client's guard, and the requests of a full run all agree."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from ifo_emulator import Emulator
from ifo_support import (
    ISVC,
    MANIFESTS,
    FakeWorker,
    by_pod_name,
    cluster_role_rules,
    eventually,
    load_yaml_docs,
    make_isvc,
    operator_config,
    running_operator,
)
from inferfleet.operator import crd, labels, rbac
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.handlers import build_registry
from inferfleet.operator.kube import PODS, SERVICES, KubeClient, UndeclaredCall


def granted() -> set[rbac.Permission]:
    return {
        rbac.Permission(group, resource, verb)
        for rule in cluster_role_rules()
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_manifest_grants_exactly_the_declared_permissions() -> None:
    assert granted() == rbac.declared()


def test_no_wildcards_and_no_secrets() -> None:
    for rule in cluster_role_rules():
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert "secrets" not in rule["resources"]
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames/nonResourceURLs games


def test_every_rule_is_commented_with_its_layer_and_reason() -> None:
    """Rule i of the ClusterRole is RULES[i], preceded by '# Framework: why' or '# Application: why'."""
    lines = (MANIFESTS / "rbac.yaml").read_text().splitlines()
    comments = []
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            above = lines[i - 1].strip()
            assert above.startswith(("# Framework:", "# Application:")), (
                f"rule at line {i + 1} is not commented"
            )
            comments.append(above.removeprefix("# "))
    assert len(comments) == len(rbac.RULES) == len(cluster_role_rules())
    for comment, rule, manifest_rule in zip(comments, rbac.RULES, cluster_role_rules()):
        layer, why = comment.split(": ", 1)
        assert layer == rule.layer
        assert why.rstrip(".") == rule.why.rstrip(".") or why.startswith(rule.why.split(":")[0]), (
            why,
            rule.why,
        )
        assert manifest_rule == {
            "apiGroups": [rule.group],
            "resources": list(rule.resources),
            "verbs": list(rule.verbs),
        }


def test_binding_targets_the_operator_service_account() -> None:
    docs = {d["kind"]: d for d in load_yaml_docs(MANIFESTS / "rbac.yaml")}
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "inferfleet-operator",
    }
    (sa,) = load_yaml_docs(MANIFESTS / "serviceaccount.yaml")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    (deploy,) = load_yaml_docs(MANIFESTS / "operator.yaml")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert (
        "--all-namespaces" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    )  # hence a ClusterRole


def test_kopf_watches_are_declared() -> None:
    """Every resource a kopf handler is registered on needs list+watch (and patch for the
    InferenceService: kopf's annotations and finalizer)."""
    registry = build_registry(OperatorConfig())
    handlers = (
        registry._changing.get_all_handlers()
        + registry._watching.get_all_handlers()
        + registry._spawning.get_all_handlers()
    )
    needed: set[rbac.Permission] = set()
    for h in handlers:
        sel = h.selector
        plural = sel.plural or sel.any_name if sel is not None else None
        assert isinstance(plural, str) and plural.islower(), h  # a specific resource, not a pattern
        group = sel.group or ""
        needed |= {rbac.Permission(group, plural, "list"), rbac.Permission(group, plural, "watch")}
        if plural == crd.PLURAL:
            needed.add(rbac.Permission(group, plural, "patch"))
    needed |= {
        rbac.Permission("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")
    }
    assert needed <= rbac.declared()


def test_client_refuses_undeclared_calls() -> None:
    kube = KubeClient(lambda: None, field_manager="t")
    kube._check(PODS, "list")
    with pytest.raises(UndeclaredCall):
        kube._check(PODS, "delete")
    with pytest.raises(UndeclaredCall):
        kube._check(SERVICES, "delete")


@pytest.mark.asyncio
async def test_a_full_run_uses_every_granted_permission(
    emulator: Emulator, fake_workers: Callable[[int], Awaitable[list[FakeWorker]]]
) -> None:
    """Create, scale by load (scale subresource, events), prune and restore: the operator's
    requests (the emulator enforces the ClusterRole) cover every grant, so none is spare."""
    (worker,) = await fake_workers(1)
    worker.set_load(waiting=50)
    urls: dict[str, str] = {}
    selector = labels.selector_string("llm", labels.WORKER)
    isvc = make_isvc(
        replicas=2,
        warmPool=1,
        balloons=1,
        maxReplicas=4,
        autoscaling={
            "enabled": True,
            "intervalSeconds": 1,
            "targetInFlightPerReplica": 20,
            "scaleDownDelaySeconds": 0,
        },
    )
    async with running_operator(operator_config(emulator, metrics_url=by_pod_name(urls))):
        emulator.put(ISVC, isvc)
        pods = await eventually(
            lambda: len(emulator.pods_of("default", selector)) == 3 and emulator.pods_of("default", selector)
        )
        for pod in pods:
            urls[pod["metadata"]["name"]] = worker.url
            emulator.set_pod_ready("default", pod["metadata"]["name"])
        await eventually(
            lambda: emulator.get(ISVC, "default", "llm")["spec"]["replicas"] == 4,
            what="scale up (150 in flight / 20 -> max 4)",
        )
        emulator.remove("v1/services", "default", "llm")
        await eventually(lambda: emulator.get("v1/services", "default", "llm"), what="service restored")
        emulator.patch(
            ISVC,
            "default",
            "llm",
            {
                "spec": {
                    "balloons": 0,
                    "prepull": {"enabled": False},
                    "warmPool": 0,
                    "autoscaling": {"enabled": False},
                    "replicas": 1,
                }
            },
        )
        await eventually(
            lambda: emulator.get("policy/v1/poddisruptionbudgets", "default", "llm") is None, what="pruned"
        )
        await eventually(
            lambda: emulator.get("apps/v1/daemonsets", "default", "llm-prepull") is None, what="pruned"
        )
        await eventually(
            lambda: emulator.get("apps/v1/deployments", "default", "llm-balloon") is None, what="pruned"
        )
        # The periodic drift check (resync_interval_s) reads every child back.
        await eventually(
            lambda: ("operator", "get", "", "services") in emulator.audit, what="a periodic drift check"
        )
    used = {
        rbac.Permission(group, res, verb) for who, verb, group, res in emulator.audit if who == "operator"
    }
    assert not emulator.denied
    assert used == rbac.declared(), (
        f"granted but unused: {rbac.declared() - used}; used: {used - rbac.declared()}"
    )
