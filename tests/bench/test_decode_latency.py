"""bench/gpu_bench.py's W3 accounting on the tiny CPU model: the decode latency is the mean of the
step() calls that return tokens 2..out_len; call 1, which launches the first decode and then
waits for the prefill's token, belongs to the time to first token."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402
from inferfleet.worker import LLM  # noqa: E402


@pytest.fixture
def tiny_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    # the bench draws ids from Llama-3's vocabulary; the tiny model has 512 tokens
    monkeypatch.setattr(gpu_bench, "random_prompt", lambda rng, n: [rng.randrange(3, 500) for _ in range(n)])


def slow_call(monkeypatch: pytest.MonkeyPatch, llm: LLM, index: int, seconds: float) -> list[int]:
    """Make step() call `index` (0-based) of the engine take `seconds` longer; returns the call log."""
    eng = llm.engine
    real = eng.step
    calls: list[int] = []

    def step():  # type: ignore[no-untyped-def]
        calls.append(len(calls))
        if calls[-1] == index:
            time.sleep(seconds)
        return real()

    monkeypatch.setattr(eng, "step", step)
    return calls


@pytest.mark.usefixtures("tiny_prompts")
def test_call_1_counts_toward_ttft_not_decode(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_llama))
    calls = slow_call(monkeypatch, llm, 1, 0.6)  # as if the prefill still ran on the device
    r = gpu_bench.decode_latency(llm, prompt_len=16, out_len=6, reps=1)
    assert len(calls) == 7  # call 0 (prefill launch), call 1 (token 1), calls 2..6 (tokens 2..6)
    assert r["call1_ms"] >= 600 and r["ttft_ms"] >= 600
    # the five calls after it (tiny CPU steps take milliseconds; counting call 1 would make >= 100)
    assert r["decode_ms_mean"] < 60
    assert r["decode_ms_mean_with_call1"] > r["decode_ms_mean"] + 600 / 6 * 0.9


@pytest.mark.usefixtures("tiny_prompts")
def test_a_slow_decode_call_counts(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_llama))
    slow_call(monkeypatch, llm, 4, 0.3)
    r = gpu_bench.decode_latency(llm, prompt_len=16, out_len=6, reps=1)
    assert r["decode_ms_mean"] >= 300 / 5 and r["decode_ms_max"] >= 300
    assert r["call1_ms"] < 150


@pytest.mark.usefixtures("tiny_prompts")
def test_bad_requests_are_refused(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="out_len >= 2"):
        gpu_bench.decode_latency(LLM(str(tiny_llama)), prompt_len=16, out_len=1, reps=1)
    # a prompt that takes two prefill chunks: calls no longer line up with tokens
    chunked = LLM(str(tiny_llama), max_num_batched_tokens=16)
    with pytest.raises(RuntimeError, match="prefill in one step"):
        gpu_bench.decode_latency(chunked, prompt_len=40, out_len=4, reps=1)
