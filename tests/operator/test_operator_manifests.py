"""manifests/: the kustomize install is valid Kubernetes, runs one operator safely, and each
example renders into valid children that match what the example says it is."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from ifo_support import K8S_VERSIONS, MANIFESTS, REPO, load_yaml_docs
from inferfleet.operator.plan import plan


def install_docs() -> list[dict[str, Any]]:
    (kustomization,) = load_yaml_docs(MANIFESTS / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (MANIFESTS / entry).resolve()
        if path.is_dir():
            (sub,) = load_yaml_docs(path / "kustomization.yaml")
            for name in sub["resources"]:
                docs += load_yaml_docs(path / name)
        else:
            docs += load_yaml_docs(path)
    return docs


def test_kustomization_lists_every_install_file() -> None:
    (kustomization,) = load_yaml_docs(MANIFESTS / "kustomization.yaml")
    listed = {entry for entry in kustomization["resources"] if not entry.startswith("..")}
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert "../crds" in kustomization["resources"]
    kinds = sorted(d["kind"] for d in install_docs())
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "PriorityClass",
            "Deployment",
        ]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_install_is_valid_kubernetes(version: str) -> None:
    for doc in install_docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_operator_deployment_runs_exactly_one_operator() -> None:
    (deploy,) = load_yaml_docs(MANIFESTS / "operator.yaml")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # never two kopf peers at once
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["inferfleet-operator"] and c["args"][0] == "run"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert any(a.startswith("--liveness=http://0.0.0.0:8080/healthz") for a in c["args"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    ns = {d["metadata"]["name"]: d for d in load_yaml_docs(MANIFESTS / "namespace.yaml")}
    assert (
        ns[deploy["metadata"]["namespace"]]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )


def test_balloon_priority_class() -> None:
    (pc,) = load_yaml_docs(MANIFESTS / "priorityclass.yaml")
    assert pc["metadata"]["name"] == "inferfleet-balloon"
    assert pc["value"] == -1  # above the cluster autoscaler's expendable cutoff (-10), below 0
    assert pc["globalDefault"] is False


EXAMPLES = {p.name: load_yaml_docs(p)[0] for p in sorted((MANIFESTS / "examples").glob("*.yaml"))}


def test_the_three_examples_exist() -> None:
    assert set(EXAMPLES) == {"tiny-cpu.yaml", "llama-3.1-8b.yaml", "quantized.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_render_valid_children(name: str, version: str) -> None:
    for obj in plan(EXAMPLES[name]):
        kubernetes_validate.validate(obj, version, strict=True)


def test_tiny_cpu_example() -> None:
    spec = EXAMPLES["tiny-cpu.yaml"]["spec"]
    assert spec["model"]["source"].startswith("tiny://")
    assert spec["resources"]["gpus"] == 0
    assert "nvidia.com/gpu" not in str(plan(EXAMPLES["tiny-cpu.yaml"]))


def test_llama_example_uses_every_cold_start_measure() -> None:
    spec = EXAMPLES["llama-3.1-8b.yaml"]["spec"]
    assert spec["resources"]["gpus"] >= 1 and spec["warmPool"] >= 1 and spec["balloons"] >= 1
    assert spec["prepull"]["enabled"] is True
    kinds = [f"{o['kind']}/{o['metadata']['name']}" for o in plan(EXAMPLES["llama-3.1-8b.yaml"])]
    assert "DaemonSet/llama-3-1-8b-prepull" in kinds and "Deployment/llama-3-1-8b-balloon" in kinds


def test_quantized_example() -> None:
    assert EXAMPLES["quantized.yaml"]["spec"]["engine"]["quantization"] == "fp8"
    deploy = plan(EXAMPLES["quantized.yaml"])[0]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--quantization") + 1] == "fp8"


def test_operator_image_never_needs_torch() -> None:
    """The operator's modules import no torch and no inferfleet.worker (checked in a clean process)."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, inferfleet.operator as op\n"
        "for m in pkgutil.iter_modules(op.__path__): importlib.import_module('inferfleet.operator.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'inferfleet.worker'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "tests")
