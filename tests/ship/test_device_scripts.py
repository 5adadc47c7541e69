"""The shell scripts run on the lent GPU machine (the `device` tool) by hand: the A/B runner, the
checkout setup they source, and the GPU test runner. CI cannot run them (no GPU), so they must at
least parse and pass shellcheck here."""

from __future__ import annotations

import subprocess

import pytest
from ship_support import REPO, tool

SCRIPTS = ["bench/ab.sh", "bench/device_setup.sh", "tests/gpu/run_on_device.sh"]


@pytest.mark.parametrize("path", SCRIPTS)
def test_parses_and_passes_shellcheck(path: str) -> None:
    script = REPO / path
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    out = subprocess.run(
        [tool("shellcheck"), "--severity=style", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
