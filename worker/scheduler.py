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

Settings for offline batches (LLM's defaults on CUDA, off for serving):
- `decode_step_tokens`: while sequences are decoding, a prompt chunk whose generation would end
  before theirs anyway (max_tokens below the most tokens a decoding sequence may still generate)
  only fills the step up to this many tokens. A decode step of a few hundred rows reads all the
  weights once whatever its row count, and its matmuls have compute to spare up to about that
  many rows, so prompt chunks that fill it cost little, where a step of prefill alone costs its
  full compute; a prompt whose generation would outlast the batch's is never held back (equal
  lengths, as in a batch of 1,000 / 1,000 requests, schedule as without the setting). The price
  is time to first token for the prompts held back.
- `due_step_tokens` (with decode_step_tokens and longest_first): a prompt that is due, i.e. whose
  generation would outlast the decoding batch's within DUE_LOOKAHEAD steps, and every prompt while
  nothing decodes (the batch's first steps), fill the step up to this many tokens instead of
  taking the whole budget (max_num_batched_tokens: W1's first step was 8,192 prompt tokens, and
  prompts that came due later made steps of up to ~2,000), since a large step costs more per token
  than one of a few hundred that rides on decodes. Only where that pays (_due_fits): the due
  prompts' tokens fit in DUE_LOOKAHEAD steps of this budget less the decoding rows (their
  generation starts at most about that many steps later), and the prompts that are not due hold
  at least as many tokens, the work that rides on the decodes meanwhile. A lone prompt (time to
  first token), a batch of equal lengths (every prompt due) and a few long prompts beside short
  requests schedule as without it. A heuristic: while nothing decodes every prompt is capped, so a
  batch of long prompts and short generations can still take up to DUE_LOOKAHEAD more steps; and
  where the check fails, a prompt within DUE_LOOKAHEAD of the horizon goes in whole where
  decode_step_tokens alone would hold it back. In bench/w1_schedule_model.py's model 55 of 400
  random offline mixes cost more, by up to ~11%, and 107 less (docs/benchmarks.md). H100, W1: ~+1%
  with the check's first form (twenty-first session); the final form 10,064-10,106 out tok/s
  (twenty-second session).
- `longest_first`: the waiting queue is kept in order of max_tokens, most first (stable). A batch
  takes at least as many steps as its longest generation has tokens; admitted first, the long
  generations overlap the prompts queued behind them instead of running alone at the end. A
  request with fewer tokens to generate can wait behind later ones: not for serving.
  A prompt held back is passed by those behind it that are not; a running one held back mid-prompt
  keeps its blocks (preemption takes the latest admitted first), so under steady arrivals a short
  prompt could wait long: these settings are for batches queued at once (LLM.generate).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, SequenceStatus

# with due_step_tokens: how many steps before its generation would outlast the batch's a prompt
# counts as due (its chunks then start early enough not to all land in one step)
DUE_LOOKAHEAD = 16


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
        decode_step_tokens: int | None = None,
        longest_first: bool = False,
        due_step_tokens: int | None = None,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # while sequences decode, the step's budget for prompts that would finish first (_deferred)
        self.decode_step_tokens = decode_step_tokens
        # with decode_step_tokens: the step's budget once a prompt is due, and while nothing decodes
        self.due_step_tokens = due_step_tokens
        self._spread_due = False  # this step's: due prompts take due_step_tokens (_due_fits)
        self.longest_first = longest_first  # waiting queue ordered by max_tokens, most first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        # (sequence, free_epoch, budget, horizon, spread_due) of an admission that did not fit
        self._blocked: tuple[Sequence, int, int, int | None, bool] | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if self.longest_first:
            # behind every waiting sequence with at least as many tokens to generate (stable); a
            # preempted sequence (put back at the front) may be passed by a longer later arrival
            i = len(self.waiting)
            while i > 0 and self.waiting[i - 1].params.max_tokens < seq.params.max_tokens:
                i -= 1
            self.waiting.insert(i, seq)
        else:
            self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        horizon = self._horizon()
        self._spread_due = (
            self.due_step_tokens is not None
            and self.decode_step_tokens is not None
            and self._due_fits(horizon)
        )
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.stop_pending:  # done by length once its last token resolves: nothing to compute
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            n = self._deferred(seq, n, budget, horizon)
            if n == 0:  # a prompt chunk that waits for a later step
                i += 1
                continue
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
        j = 0  # the queue position considered (0 unless a prompt ahead is held back this step)
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[j]
            if self._blocked == (seq, self.bm.free_epoch, budget, horizon, self._spread_due):
                break  # it did not fit last step and no block has been freed since
            if self._deferred(seq, seq.num_tokens, budget, horizon) == 0:
                j += 1  # held back (decode_step_tokens); one behind it may not be
                continue
            cached = self.bm.match_prefix(seq)
            n = self._deferred(seq, min(seq.num_tokens - seq.num_computed_tokens, budget), budget, horizon)
            if not self.bm.allocate(seq, n):
                self.bm.free(seq)  # give back the cached blocks it just took
                self._blocked = (seq, self.bm.free_epoch, budget, horizon, self._spread_due)
                break
            self._blocked = None
            self.bm.record_admission(seq, cached)
            del self.waiting[j]
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _horizon(self) -> int | None:
        """With decode_step_tokens set and sequences decoding: the most tokens any of them may still
        generate (max_tokens less what it has), a bound on the steps the batch has left; else None."""
        if self.decode_step_tokens is None:
            return None
        left = [
            s.params.max_tokens - s.num_output_tokens
            for s in self.running
            if s.num_tokens - s.num_computed_tokens == 1 and not s.stop_pending
        ]
        return max(left) if left else None

    def _due_fits(self, horizon: int | None) -> bool:
        """With due_step_tokens: whether due prompts take it this step. They do where
        - their tokens left fit in DUE_LOOKAHEAD steps of due_step_tokens less the decoding rows, so
          capping delays their generation by at most about that many steps, and
        - the prompts that are not due hold at least as many tokens: the work that rides on the
          decodes, which the capped steps leave room for.
        Otherwise they go in whole: a lone prompt (one long prompt's time to first token), a batch
        of equal lengths (every prompt due), a few long prompts beside short requests, as without
        the setting (except a prompt due only by the lookahead, which decode_step_tokens alone
        would hold back). With nothing decoding, due means within DUE_LOOKAHEAD of the longest generation
        among the prompts (longest_first puts those first in the queue), and _deferred then caps
        the others too: there the second test is a heuristic (module docstring)."""
        running = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        spare = self.due_step_tokens - (len(self.running) - len(running))  # type: ignore[operator]
        limit = DUE_LOOKAHEAD * max(spare, 0)
        prompts = (*running, *self.waiting)
        if horizon is None:
            horizon = max((s.params.max_tokens for s in prompts), default=0)
        due = rest = 0
        for s in prompts:
            n = s.num_tokens - s.num_computed_tokens
            if s.params.max_tokens >= horizon - DUE_LOOKAHEAD:
                due += n
                if due > limit:
                    return False
            else:
                rest += n
        return due <= rest

    def _deferred(self, seq: Sequence, n: int, budget: int, horizon: int | None) -> int:
        """Tokens of a chunk of n (n > 1: a prompt's) to schedule this step (0: none), with
        decode_step_tokens set:
        - sequences are decoding (horizon) and seq's generation would end before theirs anyway
          (max_tokens below the horizon, less DUE_LOOKAHEAD with due_step_tokens: waiting costs the
          batch no step): the step takes at most decode_step_tokens tokens in all;
        - otherwise (seq is due, or nothing decodes): at most due_step_tokens in all where
          _due_fits held at the start of the step, else all n.
        Without decode_step_tokens: all n."""
        if self.decode_step_tokens is None or n <= 1:
            return n
        lookahead = 0 if self.due_step_tokens is None else DUE_LOOKAHEAD
        due = horizon is None or seq.params.max_tokens >= horizon - lookahead
        cap = (self.due_step_tokens if self._spread_due else None) if due else self.decode_step_tokens
        return n if cap is None else max(0, min(n, cap - (self.max_num_batched_tokens - budget)))

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
