"""bench/profile_w3.py's step accounting on a synthetic kernel timeline shaped like the H100 trace
(kernels overlap under programmatic dependent launch): every microsecond of a step is charged
exactly once, to the kernel that extends the timeline or to a gap."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import profile_w3  # noqa: E402

# (name, start us, duration us): two steps; the norm starts under the GEMV before it (PDL) and
# waits; a host gap and a memcpy sit at the step boundary
TRACE = [
    ("_gemv_kernel", 0.0, 300.0),  # LM head
    ("void at::native::reduce_kernel<512>", 300.0, 10.0),  # sampling
    ("Memcpy HtoD (Pinned -> Device)", 330.0, 2.0),
    ("_rmsnorm_kernel", 333.0, 3.0),
    ("_gptq_row4_kernel", 335.0, 20.0),  # starts before the norm ends
    ("_paged_attention_kernel", 354.0, 6.0),
    ("_merge_kernel", 356.0, 5.0),
    ("_gemv_kernel", 361.0, 300.0),  # next LM head
    ("_rmsnorm_kernel", 660.0, 1.0),
    ("_gemv_kernel", 700.0, 300.0),
]


def test_steps_run_from_head_to_head() -> None:
    steps = profile_w3.split_steps(TRACE)
    assert [len(s) for s in steps] == [8, 3]
    assert steps[0][0] == TRACE[0] and steps[0][-1] == TRACE[7] and steps[1][-1] == TRACE[9]


def test_every_microsecond_is_charged_once() -> None:
    first, second = (profile_w3.charge(s) for s in profile_w3.split_steps(TRACE))
    assert first["step"] == pytest.approx(361.0)
    assert sum(v for k, v in first.items() if k != "step") == pytest.approx(first["step"])
    assert first["lm_head"] == 300.0
    assert first["gaps"] == pytest.approx(20.0 + 1.0)  # 310 -> 330 and 332 -> 333
    assert first["copies"] == 2.0
    assert first["norm"] == 3.0
    assert first["projection"] == pytest.approx(355.0 - 336.0)  # only what extends past the norm
    assert first["attention"] == pytest.approx(361.0 - 355.0)  # 355 -> 360, then the merge to 361
    assert second["step"] == 339.0 and second["gaps"] == pytest.approx(39.0 - 0.0)
    assert second["norm"] == 0.0 and second["lm_head"] == 300.0


def test_classes() -> None:
    assert profile_w3.classify("_gptq_row4_kernel") == "projection"
    assert profile_w3.classify("nvjet_tst_128x64") == "projection"  # cuBLAS GEMMs
    assert profile_w3.classify("_rope_cache_kernel") == "rotary+kv write"
    assert profile_w3.classify("Memset (Device)") == "copies"


def test_a_whole_run_is_charged_by_class_and_by_kernel() -> None:
    got = profile_w3.charge_window(TRACE, top=3)
    assert got["window_ms"] == pytest.approx(1.0)  # 0 -> 1,000 us
    assert sum(got["ms_by_class"].values()) == pytest.approx(1.0)
    assert got["ms_by_class"]["projection"] == pytest.approx((300 + 19 + 300 + 300) / 1e3)
    assert next(iter(got["ms_by_kernel"])) == "_gemv_kernel" and len(got["ms_by_kernel"]) == 3


def test_a_layer_is_charged_position_by_position() -> None:
    # the previous step's LM head, three layers of attention, merge and a projection starting under
    # the merge (PDL), 20 us apart, then the next LM head: the last layer runs into it, not complete
    trace = [("_gemv_kernel", -300.0, 298.0)]
    for layer in range(3):
        t = 20.0 * layer
        trace += [
            ("_paged_attention_kernel", t, 5.0),
            ("_merge_kernel", t + 5.0, 2.0),
            ("_gemv_kernel", t + 6.0, 12.0),
        ]
    trace.append(("_gemv_kernel", 61.0, 300.0))
    rows = profile_w3.per_layer(trace)
    assert [r["kernel"] for r in rows] == ["_paged_attention_kernel", "_merge_kernel", "_gemv_kernel"]
    assert [r["layers"] for r in rows] == [2, 2, 2]
    assert [r["us"] for r in rows] == [pytest.approx(5.0), pytest.approx(2.0), pytest.approx(11.0)]
    assert [r["gap_us"] for r in rows] == [pytest.approx(2.0), 0.0, 0.0]  # 18 -> 20 before each attention
    assert profile_w3.per_layer(trace[:4]) == []  # no second attention: no complete layer


def test_the_step_boundary_is_charged_position_by_position() -> None:
    rows = profile_w3.step_boundary(profile_w3.split_steps(TRACE))
    # only the first step reaches an attention kernel; its boundary is the LM head to the attention
    assert [r["kernel"] for r in rows] == [n for n, _, _ in TRACE[:5]]
    assert [r["us"] for r in rows] == [300.0, 10.0, 2.0, 3.0, pytest.approx(355.0 - 336.0)]
    assert [r["gap_us"] for r in rows] == [0.0, 0.0, 20.0, 1.0, 0.0]
    assert profile_w3.step_boundary(profile_w3.split_steps(TRACE)[1:]) == []


def test_an_lm_head_that_starts_under_the_previous_step_is_charged_past_it() -> None:
    # the previous step's last projection runs until 20 us into the LM head (PDL): that overlap
    # belongs to the previous step only
    trace = [
        ("_gemv_kernel", 0.0, 300.0),  # LM head
        ("_gemv_kernel", 300.0, 50.0),  # the last layer's projection
        ("_gemv_kernel", 330.0, 300.0),  # next LM head, from 330 (PDL), ends 630
        ("_gemv_kernel", 640.0, 300.0),
    ]
    steps = profile_w3.split_steps(trace)
    priors = profile_w3.step_priors(trace)
    assert priors == [None, 350.0]
    second = profile_w3.charge(steps[1], priors[1])
    assert second["lm_head"] == pytest.approx(630.0 - 350.0) and second["gaps"] == pytest.approx(10.0)
    assert profile_w3.charge(steps[1])["lm_head"] == 300.0  # without the prior: its whole duration
