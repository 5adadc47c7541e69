"""README.md's install and GitOps sections: the commands refer to real files and values, the
kustomize overlay it shows renders, and what it says the cluster writes is what the code writes."""

from __future__ import annotations

import pathlib
import re
import shutil

import kopf
from inferfleet.operator import crd, labels
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.handlers import configure_settings
from ship_support import CHART, REPO, default_values, kustomize

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_the_two_commands_are_there() -> None:
    two = section("Two commands")
    lines = [line.split("#")[0].strip() for line in two.splitlines()]
    assert "make demo" in lines and "make test" in lines


def test_install_sections_exist() -> None:
    install = section("Install on Kubernetes")
    for heading in ("### With Helm", "### With kustomize", "### A first InferenceService"):
        assert heading in install
    assert "helm install inferfleet charts/inferfleet -n inferfleet-system" in install
    assert "kubectl apply -f manifests/examples/tiny-cpu.yaml" in install


def test_referenced_paths_exist() -> None:
    text = section("Install on Kubernetes") + section("GitOps (Argo CD, Flux)")
    paths = set(re.findall(r"\b((?:charts|manifests|docs|e2e)/[\w./-]*[\w/])", text))
    assert len(paths) >= 6
    for path in paths:
        assert (REPO / path).exists() or (REPO / "manifests" / "examples" / path).exists(), path


def test_helm_set_flags_name_real_values() -> None:
    for key in re.findall(r"--set ([\w.]+)=", README):
        node = default_values()
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]


def test_the_kustomize_overlay_renders_with_the_new_image(tmp_path: pathlib.Path) -> None:
    (overlay,) = re.findall(r"<<'YAML'\n(.*?)\nYAML\n", README, re.DOTALL)
    for name in ("manifests", "crds"):
        shutil.copytree(REPO / name, tmp_path / name)
    (tmp_path / "my-install").mkdir()
    (tmp_path / "my-install" / "kustomization.yaml").write_text(overlay)
    (deploy,) = [o for o in kustomize(tmp_path / "my-install") if o["kind"] == "Deployment"]
    assert (
        deploy["spec"]["template"]["spec"]["containers"][0]["image"] == "REGISTRY/inferfleet-operator:0.1.0"
    )


def test_gitops_section_matches_what_the_code_writes() -> None:
    gitops = section("GitOps (Argo CD, Flux)")
    settings = kopf.OperatorSettings()
    configure_settings(settings, OperatorConfig())
    assert f"`{settings.persistence.finalizer}`" in gitops
    assert f"`{settings.persistence.progress_storage.prefix}/*`" in gitops
    assert f"`{labels.MANAGED_BY}: {labels.MANAGER}`" in gitops
    assert labels.labels("x", labels.WORKER)["app.kubernetes.io/instance"] == "x"  # the tracking-label caveat
    scale = crd.crd()["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas" and "`spec.replicas`" in gitops
    for needle in (
        "jsonPointers: [/spec/replicas]",
        "RespectIgnoreDifferences=true",
        "group: inferfleet.io",
        "kind: InferenceService",
        "driftDetection.ignore",
        "kustomize.toolkit.fluxcd.io/ssa: IfNotPresent",
    ):
        assert needle in gitops, needle
    assert (CHART / "README.md").exists()
