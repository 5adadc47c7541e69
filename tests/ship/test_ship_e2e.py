"""e2e/kind-e2e.sh (run by hand where Docker and kind exist) parses, passes shellcheck, and refers
to files, images, names and values that exist in this repository; e2e/README.md lists its exact
prerequisites."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from ship_support import CHART, E2E, MANIFESTS, REPO, load_yaml_docs, tool

SCRIPT = E2E / "kind-e2e.sh"


def script() -> str:
    return SCRIPT.read_text()


def assigned(name: str) -> str:
    (value,) = re.findall(rf"^{name}=\"?([^\"\s]+)\"?", script(), re.MULTILINE)
    return value


def test_bash_parses_it() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_shellcheck_passes() -> None:
    out = subprocess.run(
        [tool("shellcheck"), "--severity=style", "--external-sources", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_mode_and_cleanup_trap() -> None:
    assert script().startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in script()
    assert re.search(r"^trap on_exit EXIT$", script(), re.MULTILINE)
    assert "kind delete cluster" in script()
    assert SCRIPT.stat().st_mode & 0o111, "e2e/kind-e2e.sh is not executable"


def test_every_step_is_there() -> None:
    for step in (
        "kind create cluster",
        'docker build -f "$REPO/Dockerfile.operator"',
        'docker build -f "$REPO/Dockerfile.worker" --build-arg VARIANT=cpu',
        "kind load docker-image",
        'helm install "$RELEASE" "$REPO/charts/inferfleet"',
        "--for=condition=Ready",
        "port-forward",
        "/v1/chat/completions",
        "data: \\[DONE\\]",
        "{.spec.replicas}",
        "k delete -f",
        "helm uninstall",
        "app.kubernetes.io/managed-by=inferfleet-operator",
    ):
        assert step in script(), step


def test_referenced_files_exist() -> None:
    for rel in re.findall(r"\$REPO/([\w./-]+)", script()):
        assert (REPO / rel).exists(), rel


def test_names_agree_with_the_chart_and_the_example() -> None:
    kind_values = yaml.safe_load((CHART / "examples" / "kind.yaml").read_text())
    image = kind_values["image"]
    assert assigned("OPERATOR_IMAGE") == f"{image['repository']}:{image['tag']}"
    assert image["pullPolicy"] == "Never"  # loaded with `kind load`, never pulled
    assert assigned("NAMESPACE") == "inferfleet-system" and assigned("RELEASE") == "inferfleet"
    example_path = MANIFESTS / "examples" / "tiny-cpu.yaml"
    assert assigned("EXAMPLE") == "$REPO/manifests/examples/tiny-cpu.yaml"
    (example,) = load_yaml_docs(example_path.read_text())
    assert assigned("ISVC") == example["metadata"]["name"]
    assert assigned("ISVC_NAMESPACE") == example["metadata"]["namespace"]
    assert assigned("MODEL") == example["spec"]["model"]["name"]
    # The script swaps the worker image with `sed 's|^  image: .*|...|'`: exactly one such line.
    assert len(re.findall(r"^  image: ", example_path.read_text(), re.MULTILINE)) == 1
    assert example["spec"]["resources"]["gpus"] == 0 and example["spec"]["autoscaling"]["enabled"]
    # Load must outgrow one replica: LOAD_STREAMS in flight > targetInFlightPerReplica.
    (streams,) = re.findall(r'LOAD_STREAMS="\$\{LOAD_STREAMS:-(\d+)\}"', script())
    assert int(streams) > example["spec"]["autoscaling"]["targetInFlightPerReplica"]
    assert example["spec"]["maxReplicas"] > 1


@pytest.mark.parametrize(
    "prerequisite",
    [
        "Docker Engine",
        "24.0",
        "kind | v0.29.0",
        "kindest/node:v1.33.1@sha256:",
        "kubectl | v1.33",
        "Helm | v3.18",
        "curl",
        "bash | 4.0",
    ],
)
def test_readme_lists_exact_prerequisites(prerequisite: str) -> None:
    assert prerequisite in (E2E / "README.md").read_text()


def test_readme_and_script_pin_the_same_node_image() -> None:
    node = re.search(r"kindest/node:v[\d.]+@sha256:[0-9a-f]{64}", script())
    assert node and node.group(0) in (E2E / "README.md").read_text()
