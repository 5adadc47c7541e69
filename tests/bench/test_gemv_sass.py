"""The one-row GEMV's K loop in sm_90 SASS, compiled offline (bench/gemv_sass.py; no GPU needed).

Guards the ninth session's change: over whole tiles, x is read in the weights' register layout, so
no weight tile passes through shared memory; with masked loads (K not whole tiles) Triton converts
every tile through shared memory with barriers, which this also checks, so the test would notice a
Triton whose layouts no longer differ (or no longer agree) there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("triton")
import gemv_sass  # noqa: E402

STAGED = ("BAR", "STS", "LDS")


@pytest.mark.parametrize("launch", [("fp8", 8, 1024, 4, 4, 2), ("bf16", 8, 512, 4, 4, 2)])
def test_whole_tiles_keep_weights_out_of_shared_memory(launch: tuple) -> None:
    per_byte, ops, _ = gemv_sass.count(*launch, even_k=True)
    assert not any(ops[op] for op in STAGED), dict(ops)
    masked_per_byte, masked_ops, _ = gemv_sass.count(*launch, even_k=False)
    assert all(masked_ops[op] for op in STAGED), dict(masked_ops)
    assert per_byte < masked_per_byte
    # one FMA per weight element in both: the math is the same
    elems = launch[1] * launch[2] / (32 * launch[3])
    assert ops["FFMA"] == masked_ops["FFMA"] == elems
