"""Property test: random add / step / abort sequences keep the scheduler's and block manager's
invariants after every step, and every block is free once all requests are done."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inferfleet.worker import EngineConfig, LLMEngine, SamplingParams
from inferfleet.worker.kv_cache import BlockManager
from inferfleet.worker.scheduler import Scheduler
from inferfleet.worker.sequence import Sequence

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.lists(st.integers(3, 40), min_size=1, max_size=70),  # prompt (small alphabet: prefix hits)
            st.integers(1, 12),  # max_tokens
        ),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def small_engine(tiny_llama: Path) -> LLMEngine:
    # 10 blocks of 8 tokens, a 12-token step budget: chunking, preemption and eviction all happen
    return LLMEngine(
        EngineConfig(
            model=str(tiny_llama),
            device="cpu",
            dtype="float32",
            num_kv_blocks=10,
            block_size=8,
            max_model_len=80,
            max_num_batched_tokens=12,
            max_num_seqs=4,
        )
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_add_step_abort_keeps_invariants(small_engine: LLMEngine, ops: list) -> None:
    eng = small_engine
    added: list[str] = []
    for op in ops:
        if op[0] == "add":
            rid = f"q{len(added)}-{eng.stats.steps}"
            eng.add_request(
                rid, params=SamplingParams(max_tokens=op[2], ignore_eos=True), prompt_token_ids=op[1]
            )
            added.append(rid)
        elif op[0] == "step":
            for _ in range(op[1]):
                for out in eng.step():
                    assert len(out.token_ids) <= eng.max_model_len
        else:
            if added:
                eng.abort(added[op[1] % len(added)])
        eng.scheduler.check_invariants()
    while eng.has_unfinished_requests():
        eng.step()
        eng.scheduler.check_invariants()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.scheduler.running and not eng.scheduler.waiting


def _seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=8),
    num_blocks=st.integers(4, 12),
    budget=st.integers(1, 20),
)
def test_scheduler_alone_never_leaks_blocks(prompts: list[list[int]], num_blocks: int, budget: int) -> None:
    """The scheduler and block manager without a model: simulate steps by appending a token."""
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=budget)
    seqs = [_seq(str(i), p[: num_blocks * 4 - 4]) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    for _ in range(500):
        if not sched.num_unfinished:
            break
        out = sched.schedule()
        sched.check_invariants()
        sched.advance(out)
        for s in out.scheduled:
            if s.seq.num_computed_tokens == s.seq.num_tokens:
                s.seq.token_ids.append(1)
                if s.seq.num_output_tokens >= 4 or s.seq.num_tokens >= num_blocks * 4:
                    sched.finish(s.seq, "length")
        sched.check_invariants()
    assert not sched.num_unfinished, "every sequence finishes (no starvation, no deadlock)"
    assert bm.num_free_blocks == num_blocks
