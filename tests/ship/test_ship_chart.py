"""charts/inferfleet, checked by real Helm (helm-sdkpy: Helm 4's Go library): lint with the
default and every example values file, install into the API-server emulator and read back what
Helm created, validate every object for Kubernetes 1.30 and 1.33, and hold the chart to the
operator's own sources (CRDs, RBAC, command line, worker labels)."""

from __future__ import annotations

import functools
import json
import urllib.parse
from typing import Any

import jsonschema
import kopf
import kubernetes_validate
import pytest
import yaml
from inferfleet.operator import contract, crd, rbac
from inferfleet.operator.cli import _parser
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.handlers import configure_settings
from inferfleet.operator.plan import plan
from ship_installs import install_names, installed
from ship_support import (
    CHART,
    CRDS,
    K8S_VERSIONS,
    MANIFESTS,
    NAMESPACE,
    RELEASE,
    HelmEmulator,
    deep_merge,
    default_values,
    example_values,
    helm_install,
    helm_lint,
    key,
    load_yaml_docs,
    without_server_fields,
)

INSTALLS = install_names()
INFO, WARNING, ERROR = 1, 2, 3  # Helm's lint severities


def rule_dict(rule: rbac.Rule) -> dict[str, Any]:
    return {"apiGroups": [rule.group], "resources": list(rule.resources), "verbs": list(rule.verbs)}


@functools.cache
def emulated_scopes() -> dict[tuple[str, str], bool]:
    """(group, plural) -> namespaced, for every resource the emulator serves (read once)."""
    scopes: dict[tuple[str, str], bool] = {}
    for k, info in HelmEmulator().resources.items():
        scopes.setdefault((k.group, k.plural), bool(info.namespaced))
    return scopes


def is_namespaced(group: str, resource: str) -> bool:
    if group == crd.GROUP:
        return crd.crd()["spec"]["scope"] == "Namespaced"
    plural = resource.split("/")[0]
    assert (group, plural) in emulated_scopes(), f"unknown resource {group}/{plural}"
    return emulated_scopes()[(group, plural)]


CLUSTER_RULES = [r for r in rbac.RULES if not all(is_namespaced(r.group, res) for res in r.resources)]
NAMESPACED_RULES = [r for r in rbac.RULES if r not in CLUSTER_RULES]


def granted(rules: list[dict[str, Any]]) -> set[rbac.Permission]:
    return {
        rbac.Permission(g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def rule_comments(manifest: str, kind: str) -> list[list[str]]:
    """For each document of `kind` in a multi-document YAML text, the comment line above each rule."""
    out = []
    for doc in manifest.split("\n---"):
        if f"\nkind: {kind}\n" not in f"\n{doc}\n":
            continue
        lines = doc.splitlines()
        out.append(
            [lines[i - 1].strip() for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
        )
    return out


# ------------------------------------------------------------------ chart files


def test_chart_crds_are_byte_identical_to_crds_dir() -> None:
    generated = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml") if p.name != "kustomization.yaml"}
    in_chart = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert generated and in_chart == generated


def test_default_and_example_values_satisfy_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(default_values(), schema)
    for values in example_values().values():
        jsonschema.validate(deep_merge(default_values(), values), schema)


def leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        return [p for k, v in values.items() for p in leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_documented_in_the_chart_readme() -> None:
    readme = (CHART / "README.md").read_text()
    missing = [p for p in leaf_paths(default_values()) if f"`{p}`" not in readme]
    assert not missing, f"charts/inferfleet/README.md does not document {missing}"


# ------------------------------------------------------------------ helm lint


@pytest.mark.parametrize("name", INSTALLS)
def test_helm_lint_passes(name: str) -> None:
    lint = helm_lint(None if name == "default" else example_values()[name])
    # The one message is Chart.yaml's "icon is recommended" (INFO); no warnings, no errors.
    assert lint.worst() <= INFO, lint.messages


@pytest.mark.parametrize(
    "values", [{"operator": {"logLevel": "loud"}}, {"image": {"digest": "latest"}}, {"replicas": 2}]
)
def test_helm_lint_enforces_the_values_schema(values: dict[str, Any]) -> None:
    """The negative control: lint really sees the values (a schema violation is an error)."""
    lint = helm_lint(values)
    assert lint.worst() == ERROR and {"Severity": ERROR, "Path": "values.yaml", "Err": {}} in lint.messages


# ------------------------------------------------------------------ helm install (emulator)


@pytest.mark.parametrize("name", INSTALLS)
def test_install_creates_the_chart_crds_and_exactly_the_rendered_manifest(name: str) -> None:
    inst = installed(name)
    chart_crds = [d for p in sorted((CHART / "crds").iterdir()) for d in load_yaml_docs(p.read_text())]
    expected = {key(d): d for d in (*chart_crds, *inst.manifest_docs())}
    created = {key(o): without_server_fields(o) for o in inst.created}
    assert set(created) == set(expected)
    ownership = {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE}
    for k, obj in created.items():
        if k[0] != "CustomResourceDefinition":  # crds/ are created as they are, unowned
            annotations = obj["metadata"].pop("annotations")
            assert ownership.items() <= annotations.items(), k
            if rest := {a: v for a, v in annotations.items() if a not in ownership}:
                obj["metadata"]["annotations"] = rest
        assert obj == expected[k], k


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", INSTALLS)
def test_every_installed_object_is_valid_kubernetes(name: str, version: str) -> None:
    checked = 0
    for obj in installed(name).created:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not a Kubernetes API: test_service_monitor_scrapes_the_worker_services
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 6


def test_default_install_objects() -> None:
    kinds = sorted(key(o) for o in installed("default").created)
    assert kinds == sorted(
        [
            ("ClusterRole", "inferfleet-operator", None),
            ("ClusterRoleBinding", "inferfleet-operator", None),
            ("CustomResourceDefinition", "inferenceservices.inferfleet.io", None),
            ("Deployment", "inferfleet-operator", NAMESPACE),
            ("PriorityClass", "inferfleet-balloon", None),
            ("ServiceAccount", "inferfleet-operator", NAMESPACE),
        ]
    )


def test_notes_tell_the_next_steps() -> None:
    notes = installed("default").release["info"]["notes"]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/inferfleet-operator" in notes
    assert "kubectl apply -f manifests/examples/tiny-cpu.yaml" in notes
    assert "every namespace" in notes and "spec.replicas" in notes


# ------------------------------------------------------------------ the operator Deployment


def operator_container(name: str) -> dict[str, Any]:
    deploy = installed(name).one("Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("name", INSTALLS)
def test_one_operator_never_two(name: str) -> None:
    deploy = installed(name).one("Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # kopf peers must never overlap


@pytest.mark.parametrize("name", INSTALLS)
def test_operator_args_parse_with_the_operator_cli(name: str) -> None:
    values = deep_merge(default_values(), {} if name == "default" else example_values()[name])
    op = values["operator"]
    container = operator_container(name)
    assert container["command"] == ["inferfleet-operator"]
    args = _parser().parse_args(container["args"])
    assert args.command == "run"
    assert args.all_namespaces == (not op["watchNamespaces"])
    assert args.namespace == op["watchNamespaces"]
    assert (args.status_interval, args.resync_interval) == (
        op["statusIntervalSeconds"],
        op["resyncIntervalSeconds"],
    )
    assert (args.verbose, args.debug) == (op["logLevel"] == "verbose", op["logLevel"] == "debug")
    assert args.peering is None  # standalone: no peering objects, no RBAC for them


@pytest.mark.parametrize("name", INSTALLS)
def test_liveness_probe_targets_kopf_health_endpoint(name: str) -> None:
    container = operator_container(name)
    url = urllib.parse.urlsplit(_parser().parse_args(container["args"]).liveness)
    (port,) = container["ports"]
    probe = container["livenessProbe"]["httpGet"]
    assert (port["name"], port["containerPort"]) == (probe["port"], url.port)
    assert probe["path"] == url.path == "/healthz"


def test_the_operator_sets_watch_timeouts_itself() -> None:
    """`inferfleet-operator run` takes no watch-timeout flags: the operator sets kopf's watch
    timeouts from OperatorConfig, so every Deployment the chart renders runs with them."""
    settings = kopf.OperatorSettings()
    configure_settings(settings, OperatorConfig())
    server, client = settings.watching.server_timeout, settings.watching.client_timeout
    assert server is not None and client is not None and 0 < server < client


def test_image_tag_defaults_to_app_version_and_digest_pins() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert operator_container("default")["image"] == f"inferfleet-operator:{chart['appVersion']}"
    prod = example_values()["production"]["image"]
    assert operator_container("production")["image"] == f"{prod['repository']}@{prod['digest']}"


@pytest.mark.parametrize("name", INSTALLS)
def test_operator_pod_is_restricted(name: str) -> None:
    pod = installed(name).one("Deployment")["spec"]["template"]["spec"]
    container = operator_container(name)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert [v["name"] for v in pod["volumes"]] == ["tmp"] and "emptyDir" in pod["volumes"][0]


# ------------------------------------------------------------------ RBAC == operator/rbac.py


def test_cluster_wide_rbac_is_exactly_rbac_py() -> None:
    inst = installed("default")
    role = inst.one("ClusterRole")
    assert role["rules"] == [rule_dict(r) for r in rbac.RULES]
    assert granted(role["rules"]) == rbac.declared()
    manifest_rules = next(
        d for d in load_yaml_docs((MANIFESTS / "rbac.yaml").read_text()) if d["kind"] == "ClusterRole"
    )["rules"]
    assert role["rules"] == manifest_rules
    binding = inst.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = inst.one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert inst.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_every_rendered_rule_is_commented_as_in_manifests_rbac() -> None:
    """The rendered ClusterRole carries manifests/rbac.yaml's "Framework:"/"Application:" comments."""
    rendered = rule_comments(installed("default").release["manifest"], "ClusterRole")
    (from_manifests,) = rule_comments((MANIFESTS / "rbac.yaml").read_text(), "ClusterRole")
    assert rendered == [from_manifests]
    assert all(c.startswith(("# Framework:", "# Application:")) for c in from_manifests)


def test_namespaced_rbac_is_rbac_py_split_by_scope() -> None:
    """watchNamespaces: a Role per namespace with the namespaced rules, a ClusterRole with only the
    cluster-scoped ones; together exactly rbac.py."""
    inst = installed("namespaced")
    watched = example_values()["namespaced"]["operator"]["watchNamespaces"]
    assert CLUSTER_RULES and NAMESPACED_RULES
    assert inst.one("ClusterRole")["rules"] == [rule_dict(r) for r in CLUSTER_RULES]
    roles = {r["metadata"]["namespace"]: r for r in inst.find("Role")}
    bindings = {b["metadata"]["namespace"]: b for b in inst.find("RoleBinding")}
    assert set(roles) == set(bindings) == set(watched)
    for ns in watched:
        assert roles[ns]["rules"] == [rule_dict(r) for r in NAMESPACED_RULES]
        assert bindings[ns]["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert bindings[ns]["subjects"] == [
            {"kind": "ServiceAccount", "name": "inferfleet-operator", "namespace": NAMESPACE}
        ]
    assert granted(inst.one("ClusterRole")["rules"]) | granted(roles[watched[0]]["rules"]) == rbac.declared()


@pytest.mark.parametrize("name", INSTALLS)
def test_no_wildcards_and_no_secrets(name: str) -> None:
    for role in installed(name).find("ClusterRole") + installed(name).find("Role"):
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}
            assert not any("*" in rule[f] for f in rule)
            assert "secrets" not in rule["resources"]


# ------------------------------------------------------------------ PriorityClass, ServiceMonitor


def test_balloon_priority_class_is_the_operators() -> None:
    pc = installed("default").one("PriorityClass")
    assert pc["metadata"]["name"] == contract.BALLOON_PRIORITY_CLASS
    assert pc["value"] == -1 and pc["globalDefault"] is False  # above the autoscaler cutoff (-10)


def test_service_monitor_is_off_by_default() -> None:
    assert not installed("default").find("ServiceMonitor")


SERVICE_MONITOR_SPEC = {
    "namespaceSelector",
    "selector",
    "endpoints",
    "targetLabels",
    "podTargetLabels",
    "jobLabel",
}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}


def test_service_monitor_scrapes_the_worker_services() -> None:
    """The ServiceMonitor selects exactly what the operator's plan labels a worker Service with,
    on the port it names, at the worker's metrics path."""
    sm = installed("production").one("ServiceMonitor")
    assert set(sm["spec"]) <= SERVICE_MONITOR_SPEC
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    (example,) = load_yaml_docs((MANIFESTS / "examples" / "tiny-cpu.yaml").read_text())
    example = {**example, "metadata": {**example["metadata"], "uid": "u"}}
    (svc,) = [o for o in plan(example) if o["kind"] == "Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert set(endpoint) <= ENDPOINT_FIELDS
    assert endpoint["port"] == contract.PORT_NAME in [p["name"] for p in svc["spec"]["ports"]]
    assert endpoint["path"] == contract.METRICS_PATH
    assert set(sm["spec"]["targetLabels"]) <= set(svc["metadata"]["labels"])


def test_service_monitor_follows_the_watched_namespaces() -> None:
    inst = helm_install(
        {"operator": {"watchNamespaces": ["team-a"]}, "serviceMonitor": {"enabled": True}},
        namespaces=["team-a"],
    )
    assert inst.one("ServiceMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_optional_objects_can_be_left_to_the_cluster_admin() -> None:
    """An existing ServiceAccount, RBAC granted elsewhere and a pre-existing PriorityClass."""
    inst = helm_install(
        {
            "serviceAccount": {"create": False, "name": "platform-operator"},
            "rbac": {"create": False},
            "balloonPriorityClass": {"create": False},
        }
    )
    assert sorted(o["kind"] for o in inst.created) == ["CustomResourceDefinition", "Deployment"]
    assert inst.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
    # No name: `required` fails the render (helm lint only renders in lint mode, which lets it pass).
    with pytest.raises(AssertionError, match=r"serviceAccount\.name is required"):
        helm_install({"serviceAccount": {"create": False}})
