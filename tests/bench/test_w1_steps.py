"""bench/w1_steps.py's step record on the tiny CPU model: every token of a few W1 requests is in
exactly one step, decodes and prompt chunks apart, and the classes add up to the steps."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import w1_steps  # noqa: E402
from workloads import w1  # noqa: E402


def test_every_token_once_and_classes_add_up(tiny_llama: Path) -> None:
    n = 6
    res = w1_steps.run(str(tiny_llama), "cpu", kv_tokens=16 * 2048, requests=n)
    reqs = w1()[:n]
    steps = res["per_step"]
    assert res["steps"] == len(steps) > 0 and res["output_tokens"] == sum(r.max_tokens for r in reqs)
    # prompts are computed once (random ids: no prefix hits); every generated token but the last is
    # fed back as a one-token decode, and a prompt's final token samples the first output
    fed = sum(s["decodes"] + s["prompt_tokens"] for s in steps)
    assert fed == sum(len(r.prompt) + r.max_tokens - 1 for r in reqs)
    assert all(s["decode_kv_tokens"] >= s["decodes"] for s in steps)
    assert steps[0]["decodes"] == 0 and steps[0]["prompt_tokens"] > 0
    classes = res["classes"]
    for key in ("decodes", "prompt_tokens", "decode_kv_tokens", "prompt_kv_tokens"):
        assert sum(c[key] for c in classes.values()) == sum(s[key] for s in steps)
    assert sum(c["steps"] for c in classes.values()) == len(steps)
    assert classes["decode only"]["prompt_tokens"] == 0
    assert classes["decode only"]["steps"] == sum(1 for s in steps if s["prompt_tokens"] == 0)
