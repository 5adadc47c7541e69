"""The programmatic-dependent-launch switch (worker/kernels/pdl.py): off unless turned on, and
INFERFLEET_PDL=0 keeps it off; devices below compute capability 9.0 (and CPUs) never get it."""

from __future__ import annotations

import pytest
import torch

pdl = pytest.importorskip("inferfleet.worker.kernels.pdl")


@pytest.fixture(autouse=True)
def _restore() -> None:
    before = pdl.enabled()
    yield
    pdl._enabled = before


def test_switch_follows_set_enabled_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERFLEET_PDL", raising=False)
    pdl.set_enabled(True)
    assert pdl.enabled()
    pdl.set_enabled(False)
    assert not pdl.enabled()
    monkeypatch.setenv("INFERFLEET_PDL", "0")
    pdl.set_enabled(True)
    assert not pdl.enabled()


def test_cpu_is_not_supported() -> None:
    assert not pdl.supported(torch.device("cpu"))


def test_a_cpu_engine_leaves_it_off(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from inferfleet.worker import EngineConfig, LLMEngine

    pdl._enabled = False
    LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    assert not pdl.enabled()
