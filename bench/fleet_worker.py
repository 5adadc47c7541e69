"""One worker's engine as the simulator sees it: the scheduler's rule, timed by the step model.

Mirrors worker/scheduler.py: every step, running sequences go first (each decode is one token; a
sequence still in prefill takes the next chunk), then waiting requests are admitted in FIFO order
while the token budget (8,192) and max_num_seqs (256) allow, each taking a prompt chunk. A
sequence emits its first token at the end of the step that completes its prompt, then one token a
step. KV capacity (443,072 tokens measured) is not modelled: W1-like lengths peak far below it
(W1 itself measured 0 preemptions at 256 concurrent).

Cheap enough for hours of traffic: a stretch of pure-decode steps with no change in the batch is
one "run" whose time has a closed form,

    step i of a run (i = 0..n-1):  a + b*B + d*(C0 + i*B)      B decoding sequences, C0 their contexts
    n steps:                       n*(a + b*B + d*C0) + d*B*n(n-1)/2

and a run ends at the next sequence to finish. A request arriving during a run cuts it at the
first step boundary after the arrival, where the scheduler would see it.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque

from fleet_params import StepModel


@dataclasses.dataclass(eq=False)
class Request:
    rid: int
    t_arrive: float
    prompt: int
    out: int
    u_route: float = 0.0  # the routing draw, fixed per request (common random numbers)
    t_first: float = math.nan
    t_done: float = math.nan
    pod: int = -1  # the worker pod that served it
    times_served: int = 0  # the conservation check: exactly 1, or 0 and dropped
    rejections: int = 0  # 429s received
    dropped: bool = False  # rejected more often than the client retries
    _remaining: int = 0  # prompt tokens still to prefill

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_arrive

    @property
    def itl(self) -> float:
        """Mean inter-token latency over its decode steps (nan for one-token outputs)."""
        return (self.t_done - self.t_first) / (self.out - 1) if self.out > 1 else math.nan


@dataclasses.dataclass
class _Run:
    t0: float
    n: int  # steps
    decodes: int
    kv0: int
    chunks: list[tuple[Request, int]]  # prefill chunks (only in one-step runs)
    end: float


class Engine:
    """Continuous batching of one worker. The caller owns the clock: it calls `on_boundary` at
    the time `next_boundary` names (re-read after every `submit`)."""

    def __init__(self, model: StepModel, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not complete (admission order)
        self.decoding = 0  # B
        self.kv = 0  # C: the context the next decode step reads, summed over decoding sequences
        self._finish: list[tuple[int, int, Request]] = []  # (last step index, rid, request)
        self.steps = 0
        self.busy_s = 0.0
        self.run: _Run | None = None

    # -- what the metrics endpoint reports ------------------------------------------------------
    @property
    def running(self) -> int:
        return self.decoding + len(self.prefilling)

    @property
    def unstarted(self) -> int:
        """Requests holding an admission slot (released at the first token): the server answers
        429 while max_queued_requests (1024) of them wait."""
        return len(self.waiting) + len(self.prefilling)

    @property
    def load(self) -> int:
        """inferfleet_requests_waiting + inferfleet_requests_running."""
        return len(self.waiting) + self.running

    @property
    def idle(self) -> bool:
        return self.run is None and not self.waiting and self.running == 0

    @property
    def next_boundary(self) -> float | None:
        return None if self.run is None else self.run.end

    # -- driving -----------------------------------------------------------------------------
    def submit(self, req: Request, now: float) -> None:
        req._remaining = req.prompt
        self.waiting.append(req)
        if self.run is None:
            self._compose(now)
        elif not self.run.chunks and self.running < self.max_num_seqs:
            self._cut(now)

    def on_boundary(self, now: float) -> list[Request]:
        """Apply the run ending now; start the next. Returns the requests that finished."""
        run = self.run
        assert run is not None and abs(run.end - now) <= 1e-9 * max(1.0, now)
        self.steps += run.n
        self.busy_s += run.end - run.t0
        self.kv += self.decoding * run.n  # every decoding context grew by one token a step
        done: list[Request] = []
        for req, chunk in run.chunks:
            req._remaining -= chunk
            if req._remaining == 0:
                self.prefilling.remove(req)
                req.t_first = now
                if req.out == 1:
                    req.t_done = now
                    done.append(req)
                else:
                    self.decoding += 1
                    self.kv += req.prompt + 1
                    heapq.heappush(self._finish, (self.steps + req.out - 1, req.rid, req))
        while self._finish and self._finish[0][0] == self.steps:
            _, _, req = heapq.heappop(self._finish)
            self.decoding -= 1
            self.kv -= req.prompt + req.out
            req.t_done = now
            done.append(req)
        self.run = None
        self._compose(now)
        return done

    # -- internals ---------------------------------------------------------------------------
    def _compose(self, now: float) -> None:
        admissible = self.waiting and self.running < self.max_num_seqs
        if self.prefilling or admissible:
            budget = self.max_batched_tokens - self.decoding
            chunks: list[tuple[Request, int]] = []
            for req in self.prefilling:
                if budget <= 0:
                    break
                n = min(req._remaining, budget)
                chunks.append((req, n))
                budget -= n
            while self.waiting and budget > 0 and self.running < self.max_num_seqs:
                req = self.waiting.popleft()
                self.prefilling.append(req)
                n = min(req._remaining, budget)
                chunks.append((req, n))
                budget -= n
            prefill = sum(n for _, n in chunks)
            ms = self.model.step_ms(self.decoding, prefill, self.kv)
            self.run = _Run(now, 1, self.decoding, self.kv, chunks, now + ms / 1000.0)
        elif self.decoding:
            n = self._finish[0][0] - self.steps
            self.run = _Run(now, n, self.decoding, self.kv, [], now + self._run_ms(n) / 1000.0)
        else:
            self.run = None

    def _run_ms(self, n: int, run: _Run | None = None) -> float:
        b, kv0 = (self.decoding, self.kv) if run is None else (run.decodes, run.kv0)
        m = self.model
        return n * (m.a_ms + m.b_ms * b + m.d_ms * kv0) + m.d_ms * b * n * (n - 1) / 2

    def _cut(self, now: float) -> None:
        """End the current decode run at the first step boundary at or after `now`."""
        run = self.run
        assert run is not None and run.n >= 1
        dt_ms = (now - run.t0) * 1000.0
        m = self.model
        base = m.a_ms + m.b_ms * run.decodes + m.d_ms * run.kv0
        half = m.d_ms * run.decodes / 2
        # smallest k with base*k + half*k*(k-1) >= dt_ms
        if half > 0:
            k = math.ceil((-(base - half) + math.sqrt((base - half) ** 2 + 4 * half * dt_ms)) / (2 * half))
        else:
            k = math.ceil(dt_ms / base)
        k = max(1, k)
        while k > 1 and self._run_ms(k - 1, run) >= dt_ms:
            k -= 1
        while k < run.n and self._run_ms(k, run) < dt_ms:
            k += 1
        if k < run.n:
            run.n = k
            run.end = run.t0 + self._run_ms(k, run) / 1000.0


def replay_offline(
    model: StepModel, lengths: list[tuple[int, int]], max_num_seqs: int, max_batched_tokens: int
) -> tuple[float, int]:
    """All requests queued at t=0, as bench/gpu_bench.py does: (seconds, steps) to drain them."""
    eng = Engine(model, max_num_seqs, max_batched_tokens)
    for i, (p, o) in enumerate(lengths):
        req = Request(i, 0.0, p, o)
        req._remaining = p
        eng.waiting.append(req)
    eng._compose(0.0)
    now = 0.0
    while eng.next_boundary is not None:
        now = eng.next_boundary
        eng.on_boundary(now)
    return now, eng.steps
