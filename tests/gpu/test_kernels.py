"""Runs kernel_cases.py and quant_cases.py: natively on a CUDA machine, else under Triton's
interpreter in a fresh process (TRITON_INTERPRET must be set before Triton is first imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("kernel_cases.py")
QUANT_CASES = Path(__file__).with_name("quant_cases.py")


def test_triton_kernels_in_interpreter() -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: run natively (pytest tests/gpu/kernel_cases.py tests/gpu/quant_cases.py)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES), str(QUANT_CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # 276 s alone on the 2-core development machine (twenty-second session)
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
