"""Continuous batching with chunked prefill under a per-step token budget.

Every sequence is just (token_ids, num_computed_tokens): a step schedules for each chosen sequence
`num_new_tokens <= num_tokens - num_computed_tokens`. A decode is the case num_new_tokens == 1; a
prefill chunk is anything larger; a preempted sequence (computed reset to 0) is recomputed the same
way. When a step brings a sequence to num_computed == num_tokens, the runner samples its next token.

Order of one step:
  1. running sequences, oldest admission first, each takes min(remaining, budget) tokens;
     when blocks run out, the most recently admitted running sequence is preempted (its blocks
     freed, back to the front of the waiting queue) until the allocation fits;
  2. if nothing was preempted, waiting sequences are admitted in FIFO order while the budget,
     max_num_seqs and free blocks allow, each taking its cached prefix first.
FIFO admission plus "running first" means nothing starves: the head of the queue is admitted as
soon as blocks free up, and every admitted sequence progresses every step it is not preempted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step completes the known tokens, so the model's output is a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        # (head of the queue, free_epoch, budget) of an admission that did not fit
        self._blocked: tuple[Sequence, int, int] | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.stop_pending:  # done by length once its last token resolves: nothing to compute
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._blocked == (seq, self.bm.free_epoch, budget):
                break  # it did not fit last step and no block has been freed since
            cached = self.bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, n):
                self.bm.free(seq)  # give back the cached blocks it just took
                self._blocked = (seq, self.bm.free_epoch, budget)
                break
            self._blocked = None
            self.bm.record_admission(seq, cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        # recompute later: free everything; cached full blocks may still be revived at readmission
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def advance(self, out: SchedulerOutput) -> None:
        """After the model ran: count computed tokens and publish newly full blocks."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.bm.register_full_blocks(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is; frees all its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def check_invariants(self) -> None:
        live = [*self.running, *self.waiting]
        assert len(self.running) <= self.max_num_seqs
        for s in self.waiting:
            assert s.status is SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
        for s in self.running:
            assert s.status is SequenceStatus.RUNNING
            assert 0 <= s.num_computed_tokens <= s.num_tokens
            assert s.stop_pending or s.num_computed_tokens < s.num_tokens
            assert len(s.block_table) * self.bm.block_size >= s.num_computed_tokens
        self.bm.check_invariants(live)
