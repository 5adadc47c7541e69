"""The fp8-cache decode attention's key loop in sm_90 SASS, compiled offline (bench/attention_sass.py;
no GPU needed).

Guards the sixteenth session's change: V, stored key-major, is read as int32 words and widened to
fp16 in that load layout (paged_attention._widen_e4m3_words), so no byte-wise shared-memory loads
(LDS.U8) remain in the loop; without it Triton gathers V's dot operand one byte per instruction,
which this also checks, so the test would notice a Triton that no longer does (the widening would
then be worth measuring again). Both convert the same elements: K's and V's, two per instruction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("triton")
import attention_sass  # noqa: E402
from row4_sass import opcodes  # noqa: E402


def test_widened_v_leaves_no_byte_loads_in_the_key_loop() -> None:
    launch = ("fp8", 128, 4, 2)  # paged_attention.DEFAULT_TUNING's fp8 decode launch
    widened, _ = attention_sass.loop(*launch, widen_v=True)
    plain, _ = attention_sass.loop(*launch, widen_v=False)
    byte_loads = [sum("LDS.U8" in line for line in body) for body in (widened, plain)]
    assert byte_loads[0] == 0 and byte_loads[1] > 0, byte_loads
    # e4m3 -> f16 conversions: 128 keys x 128 channels x (K, V) over 128 threads, two per instruction
    conversions = [sum("F2FP.F16.E4M3" in line for line in body) for body in (widened, plain)]
    assert conversions == [128, 128], conversions
    assert len(widened) < len(plain), (len(widened), len(plain), dict(opcodes(widened)))
