"""The scheduler's offline settings: longest_first admission, decode_step_tokens and
due_step_tokens (scheduler.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferfleet.worker import EngineConfig, SamplingParams
from inferfleet.worker.errors import InvalidRequestError
from inferfleet.worker.kv_cache import BlockManager
from inferfleet.worker.scheduler import DUE_LOOKAHEAD, Scheduler, SchedulerOutput
from inferfleet.worker.sequence import Sequence


def seq(rid: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler) -> dict[str, int]:
    """One step without a model: schedule, advance, a token for every sequence that sampled;
    returns {request id: tokens scheduled}."""
    out: SchedulerOutput = sched.schedule()
    sched.check_invariants()
    sched.advance(out)
    for s in out.scheduled:
        if s.seq.num_computed_tokens == s.seq.num_tokens:
            s.seq.token_ids.append(1)
            if s.seq.num_output_tokens >= s.seq.params.max_tokens:
                sched.finish(s.seq, "length")
    return {s.seq.request_id: s.num_new_tokens for s in out.scheduled}


def test_longest_first_keeps_waiting_in_order_of_max_tokens() -> None:
    sched = Scheduler(BlockManager(64, 4), 1, 8, longest_first=True)
    for rid, m in (("a", 5), ("b", 20), ("c", 10), ("d", 20), ("e", 1)):
        sched.add(seq(rid, 3, m))
    assert [s.request_id for s in sched.waiting] == ["b", "d", "c", "a", "e"]  # ties keep arrival order
    fifo = Scheduler(BlockManager(64, 4), 1, 8)
    for rid, m in (("a", 5), ("b", 20)):
        fifo.add(seq(rid, 3, m))
    assert [s.request_id for s in fifo.waiting] == ["a", "b"]


def test_decode_step_tokens_holds_back_only_prompts_that_end_first() -> None:
    sched = Scheduler(
        BlockManager(256, 4, enable_prefix_caching=False), 8, 64, decode_step_tokens=16, longest_first=True
    )
    sched.add(seq("long", 4, 50))
    assert run_step(sched) == {"long": 4}  # nothing decodes yet: the whole budget
    sched.add(seq("short", 40, 10))
    sched.add(seq("longer", 40, 60))
    # "long" decodes with 49 tokens to go: "longer" (60) would outlast it and takes its whole prompt;
    # "short" (10) would end first and waits while the step already holds 41 > 16 tokens
    assert run_step(sched) == {"long": 1, "longer": 40}
    # two decodes, then "short" fills the step up to 16 tokens, chunk by chunk
    assert run_step(sched) == {"long": 1, "longer": 1, "short": 14}
    assert run_step(sched) == {"long": 1, "longer": 1, "short": 14}
    assert run_step(sched) == {"long": 1, "longer": 1, "short": 12}
    assert run_step(sched) == {"long": 1, "longer": 1, "short": 1}


def test_due_step_tokens_caps_due_prompts_and_the_first_steps() -> None:
    sched = Scheduler(
        BlockManager(256, 4, enable_prefix_caching=False), 8, 64, decode_step_tokens=16, longest_first=True,
        due_step_tokens=24,
    )  # fmt: skip
    sched.add(seq("long", 40, 50))
    sched.add(seq("brief", 50, 5))  # not due, and at least as many tokens as the due "long": they ride
    # nothing decodes yet: the first steps take due_step_tokens in all, not the whole budget of 64
    assert run_step(sched) == {"long": 24}
    assert run_step(sched) == {"long": 16, "brief": 8}
    sched.add(seq("short", 40, 10))
    sched.add(seq("longer", 40, 60))
    # "long" decodes with 49 tokens to go; "brief" (5) fills the step up to 16 and "longer" (60),
    # due, up to 24, chunk by chunk; "short" (10) would end first and waits while the step holds >= 16
    assert run_step(sched) == {"long": 1, "brief": 15, "longer": 8}
    assert run_step(sched) == {"long": 1, "brief": 15, "longer": 8}
    assert run_step(sched) == {"long": 1, "brief": 12, "longer": 11}
    assert run_step(sched) == {"long": 1, "brief": 1, "longer": 13, "short": 1}


def test_due_prompts_go_in_whole_where_capping_would_not_pay() -> None:
    """The due budget applies only where the due prompts' tokens fit in DUE_LOOKAHEAD steps of its
    spare rows and the prompts that are not due hold at least as many tokens; otherwise a step
    schedules as without it: a lone prompt (one long prompt's time to first token), a batch whose
    prompts are all due (equal lengths), a long prompt beside a short request, and due prompts with
    more tokens than the lookahead's steps hold."""

    def steps(due: int | None, reqs: list[tuple[int, int]], max_num_seqs: int = 8) -> list[dict[str, int]]:
        sched = Scheduler(
            BlockManager(1024, 4),
            max_num_seqs,
            64,
            decode_step_tokens=8,
            longest_first=True,
            due_step_tokens=due,
        )
        for i, (prompt, max_tokens) in enumerate(reqs):
            sched.add(seq(f"r{i}", prompt, max_tokens))
        return [run_step(sched) for _ in range(30)]

    assert steps(4, [(60, 1)])[0] == {"r0": 60}  # a lone prompt: one step
    for reqs, n in (([(30, 8)] * 10, 8), ([(40, 4)] * 4, 2)):  # all due, the second in two waves
        assert steps(4, reqs, n) == steps(None, reqs, n)
    assert steps(8, [(60, 20), (4, 3)]) == steps(None, [(60, 20), (4, 3)])  # 4 tokens ride, 60 wait
    # "r0", "r1" and "r2" are due with 124 tokens, more than 16 steps of a budget of 4 hold
    many = [(4, 40), (60, 40), (60, 40), (8, 3)]
    assert steps(4, many) == steps(None, many)
    # 34 due tokens fit 16 steps of 9 and "r2" holds 200 that ride: capped at 9 tokens a step
    capped = [(4, 40), (30, 40), (200, 3)]
    assert steps(None, capped)[:2] == [{"r0": 4, "r1": 30, "r2": 30}, {"r0": 1, "r1": 1, "r2": 6}]
    assert steps(9, capped)[:2] == [{"r0": 4, "r1": 5}, {"r0": 1, "r1": 8}]


def test_due_counts_from_the_lookahead_before_the_horizon() -> None:
    """With due_step_tokens a prompt is due DUE_LOOKAHEAD steps before its generation would outlast
    the batch's: it takes the due budget where, without the setting, it takes decode_step_tokens."""

    def first_chunk(due: int | None) -> dict[str, int]:
        sched = Scheduler(
            BlockManager(512, 4), 8, 64, decode_step_tokens=8, longest_first=True, due_step_tokens=due
        )
        sched.add(seq("long", 4, 50))
        run_step(sched)  # "long" decodes from here, 49 tokens to go
        sched.add(seq("soon", 40, 49 - DUE_LOOKAHEAD))
        sched.add(seq("later", 60, 5))  # not due: tokens that ride, so that capping "soon" pays
        return run_step(sched)

    assert first_chunk(None) == {"long": 1, "soon": 7}  # ends first: the decode budget of 8
    assert first_chunk(32) == {"long": 1, "soon": 31}  # due within the lookahead: up to 32


def test_equal_lengths_schedule_as_without_the_setting() -> None:
    """A batch of equal max_tokens (W2's 1000 / 1000): no prompt ends before the decodes, so no
    prompt is held back and every step is what the plain scheduler makes of it."""

    def steps(decode_step_tokens: int | None) -> list[dict[str, int]]:
        sched = Scheduler(BlockManager(512, 4), 6, 48, decode_step_tokens=decode_step_tokens)
        for i in range(10):
            sched.add(seq(f"r{i}", 30, 8))
        return [run_step(sched) for _ in range(40)]

    assert steps(8) == steps(None)


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=10),
    num_blocks=st.integers(10, 24),
    budget=st.integers(1, 20),
    decode_budget=st.integers(1, 20),
    longest_first=st.booleans(),
    due_budget=st.one_of(st.none(), st.integers(1, 20)),
)
def test_offline_settings_never_starve_or_leak(
    reqs: list[tuple[int, int]],
    num_blocks: int,
    budget: int,
    decode_budget: int,
    longest_first: bool,
    due_budget: int | None,
) -> None:
    """Preemption, chunking and held-back prompts together: every sequence finishes, every block
    comes back, and no step exceeds its budget."""
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=True)
    sched = Scheduler(
        bm,
        3,
        budget,
        decode_step_tokens=decode_budget,
        longest_first=longest_first,
        due_step_tokens=due_budget,
    )
    for i, (n, m) in enumerate(reqs):
        sched.add(seq(str(i), min(n, num_blocks * 4 - 16), m))
    for _ in range(2000):
        if not sched.num_unfinished:
            break
        assert sum(run_step(sched).values()) <= budget
    assert not sched.num_unfinished
    assert bm.num_free_blocks == num_blocks


def test_config_checks_and_offline_defaults(tiny_llama: Path) -> None:
    for bad in (
        {"decode_step_tokens": 0},
        {"due_step_tokens": 0},
        {"admission": "shortest_first"},
        {"decode_step_tokens": 8, "due_step_tokens": 32},  # fifo: the first steps would cap the wrong prompts
        {"admission": "longest_first", "due_step_tokens": 32},  # no decode budget
    ):
        with pytest.raises(InvalidRequestError):
            EngineConfig(model=str(tiny_llama), device="cpu", **bad)  # type: ignore[arg-type]
    from inferfleet.worker import LLM

    cpu = LLM(model=str(tiny_llama), device="cpu").engine.scheduler
    assert cpu.decode_step_tokens is None and not cpu.longest_first  # the offline settings are CUDA's
    assert cpu.due_step_tokens is None  # off unless asked for, on CUDA too
    asked = LLM(
        model=str(tiny_llama),
        device="cpu",
        admission="longest_first",
        decode_step_tokens=8,
        due_step_tokens=32,
    ).engine.scheduler
    assert (asked.decode_step_tokens, asked.due_step_tokens) == (8, 32)


def test_a_held_back_prompt_does_not_hold_up_the_ones_behind_it() -> None:
    """FIFO order with a decode budget: the head of the queue would end before the decodes and is
    held back (the step's one token is a decode's), the request behind it would outlast them and
    is admitted past it; the held-back one starts once no decode is left to outlast it."""
    sched = Scheduler(BlockManager(256, 4, enable_prefix_caching=False), 8, 64, decode_step_tokens=1)
    sched.add(seq("long", 4, 4))
    assert run_step(sched) == {"long": 4}
    sched.add(seq("short", 20, 2))
    sched.add(seq("longer", 20, 5))
    # "long" may generate 3 more: "short" (2) would end first, "longer" (5) would outlast it
    assert run_step(sched) == {"long": 1, "longer": 20}
    assert [s.request_id for s in sched.waiting] == ["short"]
    for _ in range(10):
        horizon = sched._horizon()
        if "short" in run_step(sched):
            assert horizon is None or horizon <= 2  # admitted once it would no longer end first
            break
    else:
        raise AssertionError("the held-back prompt was never admitted")


def test_llm_offline_defaults_follow_admission(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM on CUDA takes longest_first with the decode and due budgets, or none with admission="fifo"
    (EngineConfig is built on a CPU device here: only the defaults LLM passes are checked)."""
    from inferfleet.worker import llm as llm_mod

    seen: list[dict] = []

    class Stop(Exception):
        pass

    def fake_config(**kw: object) -> None:
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(llm_mod, "EngineConfig", fake_config)
    for extra in ({}, {"admission": "fifo"}):
        with pytest.raises(Stop):
            llm_mod.LLM(model=str(tiny_llama), device="cuda", **extra)
    assert (
        seen[0]["admission"] == "longest_first"
        and seen[0]["decode_step_tokens"] == llm_mod.OFFLINE_DECODE_STEP_TOKENS
        and seen[0]["due_step_tokens"] == llm_mod.OFFLINE_DUE_STEP_TOKENS
    )
    assert seen[1]["admission"] == "fifo" and "decode_step_tokens" not in seen[1]
    with pytest.raises(Stop):  # no decode budget: no due budget either (it is one of its cases)
        llm_mod.LLM(model=str(tiny_llama), device="cuda", decode_step_tokens=None)
    assert seen[2]["decode_step_tokens"] is None and "due_step_tokens" not in seen[2]
