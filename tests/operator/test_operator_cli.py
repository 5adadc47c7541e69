"""inferfleet-operator: `render` prints valid multi-document YAML without a cluster, `crd` prints
the checked-in CRD, and `run` (a real subprocess, kubeconfig login) serves the emulator."""

from __future__ import annotations

import asyncio
import io
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import kubernetes_validate
import pytest
import yaml
from ifo_emulator import Emulator
from ifo_support import ISVC, MANIFESTS, REPO, eventually, make_isvc
from inferfleet.operator import cli, crd

CONSOLE = shutil.which("inferfleet-operator", path=os.path.dirname(sys.executable)) or "inferfleet-operator"


def test_render_tiny_cpu_example_prints_valid_yaml() -> None:
    out = subprocess.run(
        [CONSOLE, "render", "-f", str(MANIFESTS / "examples" / "tiny-cpu.yaml")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    docs = list(yaml.safe_load_all(out))
    assert [f"{d['kind']}/{d['metadata']['name']}" for d in docs] == ["Deployment/tiny", "Service/tiny"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_render_reads_stdin_and_overrides_the_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    stdin = io.StringIO(yaml.safe_dump_all([{"kind": "ConfigMap"}, make_isvc(name="a"), make_isvc(name="b")]))
    out = io.StringIO()
    assert cli.render(["-"], "team-a", out, stdin) == 0
    docs = list(yaml.safe_load_all(out.getvalue()))
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    assert {d["metadata"]["name"] for d in docs} >= {"a", "b", "a-prepull", "b-prepull"}


def test_render_rejects_invalid_specs(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(make_isvc(warmPool=99)))
    assert cli.main(["render", "-f", str(bad)]) == 2
    assert "spec.warmPool" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("kind: ConfigMap\n")
    assert cli.main(["render", "-f", str(empty)]) == 1


def test_crd_command_prints_the_checked_in_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == (REPO / "crds" / crd.CRD_FILENAME).read_text()


def _free_port() -> int:
    # The kopf liveness endpoint takes a port number; the OS picks one that is free right now.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_run_subprocess_serves_the_cluster(emulator: Emulator, tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": str(emulator.url).rstrip("/")}}],
                "users": [{"name": "operator", "user": {"token": emulator.operator_token}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "operator"}}],
                "current-context": "emu",
            }
        )
    )
    port = _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    proc = await asyncio.create_subprocess_exec(
        CONSOLE,
        "run",
        "-A",
        f"--liveness=http://127.0.0.1:{port}/healthz",
        "--status-interval=1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:

        async def healthy() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the operator exited with {proc.returncode}")
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, timeout=30, what="the liveness endpoint")
        emulator.put(ISVC, make_isvc(replicas=2))
        await eventually(
            lambda: emulator.get("policy/v1/poddisruptionbudgets", "default", "llm"),
            timeout=30,
            what="children",
        )
        assert emulator.get("apps/v1/deployments", "default", "llm")["spec"]["replicas"] == 2
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, output.decode()[-3000:]
