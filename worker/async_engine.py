"""The engine behind an event loop: one thread owns the (not thread-safe) LLMEngine.

    event loop (aiohttp)                       engine thread
    ---------------------                      ------------------------------------------
    submit() --("add", ...)--> command queue --> engine.add_request
    abort()  --("abort", id)->               --> engine.abort (blocks go back to the pool)
    GenerationStream <--call_soon_threadsafe--- engine.step() outputs, once per step
    metrics scrape  <--- EngineSnapshot (replaced whole after every step) ---

The thread also loads the model and warms it up, so the HTTP server listens from the first
second and reports the phase ("loading" -> "warming_up" -> "ready"). If a step raises, the
engine is dead: every stream in flight gets EngineDeadError, and so does every later submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import EngineDeadError, InferfleetError
from .metrics import EngineSnapshot, ServerMetrics

if TYPE_CHECKING:
    from .engine import LLMEngine
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams
    from .sequence import Sequence

log = logging.getLogger(__name__)

# when the engine holds requests but a step did nothing (e.g. all paused or nothing fits), wait
# this long for a command instead of spinning
_IDLE_WAIT_S = 0.005


class GenerationStream:
    """The outputs of the engine requests behind one HTTP request (one per choice), in order.

    Iterate with `async for index, output in stream`; it ends when every choice has finished and
    raises the engine's error if there is one. `abort()` stops the unfinished choices.
    """

    def __init__(
        self, engine: AsyncEngine, request_ids: list[str], arrival: float, metrics: ServerMetrics | None
    ) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._pending = set(request_ids)  # not finished yet, as far as the loop knows
        self._failed = False
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._arrival = arrival
        self._metrics = metrics
        self._last_token: dict[str, float] = {}

    def _put(self, out: RequestOutput, queue_time: float | None) -> None:
        rid = out.request_id
        if rid not in self._pending:
            return
        if out.finished:
            self._pending.discard(rid)
        if self._failed:
            return
        self._observe(out, queue_time)
        self._queue.put_nowait((self._index[rid], out))

    def _fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            self._queue.put_nowait(exc)

    def _observe(self, out: RequestOutput, queue_time: float | None) -> None:
        m = self._metrics
        if m is None:
            return
        now = time.monotonic()
        if queue_time is not None:
            m.queue_time.observe(max(queue_time, 0.0))
        if out.new_token_ids:
            last = self._last_token.get(out.request_id)
            if last is None:
                m.ttft.observe(now - self._arrival)
            else:
                m.itl.observe((now - last) / len(out.new_token_ids))
            self._last_token[out.request_id] = now
        if out.finished and out.finish_reason != "abort":
            m.e2e.observe(now - self._arrival)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while (self._pending and not self._failed) or not self._queue.empty():
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def abort(self) -> None:
        """Abort every choice that has not finished, failed streams included (idempotent; the
        engine frees their blocks)."""
        for rid in sorted(self._pending):
            self._engine.abort(rid)


@dataclass
class _Live:
    stream: GenerationStream
    seq: Sequence
    started: bool = False


_Delivery = tuple[GenerationStream, "RequestOutput", float | None]


class AsyncEngine:
    def __init__(
        self,
        build: Callable[[], LLMEngine],
        on_phase: Callable[[str], None],
        metrics: ServerMetrics | None = None,
        load_hook: Callable[[str], None] | None = None,
    ) -> None:
        """`build` constructs the engine (in the engine thread); `on_phase` is called on the event
        loop with "warming_up", "ready" or "dead"; `load_hook(phase)` runs in the engine thread as
        each loading phase begins (tests use it to hold a phase open)."""
        self._build = build
        self._on_phase = on_phase
        self._metrics = metrics
        self._load_hook = load_hook
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit() against the engine dying
        self._dead: BaseException | None = None
        self._stopped = False
        self._steps_allowed = threading.Event()
        self._steps_allowed.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.engine: LLMEngine | None = None  # set once warm; touch only from the engine thread
        self.snapshot = EngineSnapshot()
        self.startup_seconds: dict[str, float] = {}

    # -- event loop side -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    def submit(
        self,
        requests: list[tuple[str, list[int], SamplingParams]],
        arrival: float,
    ) -> GenerationStream:
        """Queue (request_id, prompt_token_ids, params) triples as one stream; each prompt must have
        passed the engine's validate_prompt. Call on the loop."""
        stream = GenerationStream(self, [r[0] for r in requests], arrival, self._metrics)
        with self._lock:
            if self._dead is not None or self._stopped:
                raise EngineDeadError("the engine is not running")
            for rid, ids, params in requests:
                self._cmds.put(("add", stream, rid, ids, params, arrival))
        return stream

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    def pause(self) -> None:
        """Stop stepping (requests still queue up and can be aborted). For tests and operators."""
        self._steps_allowed.clear()

    def resume(self) -> None:
        self._steps_allowed.set()
        self._cmds.put(("wake",))

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, stop the thread and wait for it (up to `timeout`)."""
        with self._lock:
            self._stopped = True
        self._steps_allowed.set()
        self._cmds.put(("stop",))
        t = self._thread
        if t is not None and t.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, t.join, timeout)

    # -- engine thread -------------------------------------------------------------------------

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # the loop may close between the check and the call
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _enter(self, phase: str) -> None:
        self._notify(self._on_phase, phase)
        if self._load_hook is not None:
            self._load_hook(phase)

    def _run(self) -> None:
        try:
            self._enter("loading")
            engine = self._build()
            self.startup_seconds = dict(engine.startup_seconds)
            self._enter("warming_up")
            engine.warmup()
            self.startup_seconds = dict(engine.startup_seconds)
        except BaseException as e:
            if isinstance(e, InferfleetError):
                log.error("model load failed: %s", e)
            else:
                log.exception("model load failed")
            self._die(e, {})
            return
        self.engine = engine
        self._publish(engine)
        self._notify(self._on_phase, "ready")
        live: dict[str, _Live] = {}
        try:
            self._serve(engine, live)
        except BaseException as e:
            log.exception("engine step failed; the engine is dead")
            self._die(e, live)

    def _serve(self, engine: LLMEngine, live: dict[str, _Live]) -> None:
        idle = False  # the last step scheduled nothing (e.g. nothing fits): wait a little, don't spin
        while True:
            can_step = engine.has_unfinished_requests() and self._steps_allowed.is_set()
            if not can_step:
                cmds = self._take(block=True)
            else:
                cmds = self._take(block=idle, timeout=_IDLE_WAIT_S)
            deliveries: list[_Delivery] = []
            stop = self._apply(engine, live, cmds, deliveries)
            if stop or not (engine.has_unfinished_requests() and self._steps_allowed.is_set()):
                self._publish(engine)
                self._deliver(deliveries)
                if stop:
                    return
                idle = False
                continue
            before = engine.stats.steps
            for out in engine.step():
                lv = live.get(out.request_id)
                if lv is None:
                    continue
                queue_time = None
                if not lv.started:
                    lv.started = True
                    seq = lv.seq
                    if seq.first_scheduled_time is not None:
                        queue_time = seq.first_scheduled_time - seq.arrival_time
                if out.finished:
                    del live[out.request_id]
                deliveries.append((lv.stream, out, queue_time))
            self._publish(engine)
            self._deliver(deliveries)
            idle = engine.stats.steps == before

    def _take(self, block: bool, timeout: float | None = None) -> list[tuple[Any, ...]]:
        cmds: list[tuple[Any, ...]] = []
        if block:
            try:
                cmds.append(self._cmds.get(timeout=timeout))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(
        self,
        engine: LLMEngine,
        live: dict[str, _Live],
        cmds: list[tuple[Any, ...]],
        deliveries: list[_Delivery],
    ) -> bool:
        """Run commands in order; True when told to stop (everything left is aborted)."""
        stop = False
        for cmd in cmds:
            if cmd[0] == "add":
                _, stream, rid, ids, params, arrival = cmd
                try:
                    # the server validated the prompt (serving._plan); the engine thread only queues it
                    seq = engine.enqueue(rid, ids, params, arrival)
                except InferfleetError as e:  # a request id already in use
                    self._notify(stream._fail, e)
                    continue
                live[rid] = _Live(stream, seq)
            elif cmd[0] == "abort":
                self._abort(engine, live, cmd[1], deliveries)
            elif cmd[0] == "stop":
                stop = True
        if stop:
            for rid in list(live):
                self._abort(engine, live, rid, deliveries)
        return stop

    @staticmethod
    def _abort(engine: LLMEngine, live: dict[str, _Live], rid: str, deliveries: list[_Delivery]) -> None:
        out = engine.abort(rid)
        lv = live.pop(rid, None)
        if out is not None and lv is not None:
            deliveries.append((lv.stream, out, None))

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        if deliveries:
            self._notify(_deliver_on_loop, deliveries)

    def _publish(self, engine: LLMEngine) -> None:
        bm = engine.block_manager
        st = engine.stats
        self.snapshot = EngineSnapshot(
            num_waiting=engine.num_waiting,
            num_running=engine.num_running,
            kv_cache_usage=engine.kv_cache_usage(),
            prompt_tokens=st.prompt_tokens,
            generation_tokens=st.generation_tokens,
            preemptions=st.preemptions,
            finished=dict(st.finished),
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
        )

    def _die(self, exc: BaseException, live: dict[str, _Live]) -> None:
        with self._lock:
            self._dead = exc
            streams = {id(lv.stream): lv.stream for lv in live.values()}
            for cmd in self._take(block=False):
                if cmd[0] == "add":
                    streams[id(cmd[1])] = cmd[1]
        err = EngineDeadError(f"the engine failed: {type(exc).__name__}")
        for s in streams.values():
            self._notify(s._fail, err)
        self._notify(self._on_phase, "dead")


def _deliver_on_loop(deliveries: list[_Delivery]) -> None:
    for stream, out, queue_time in deliveries:
        stream._put(out, queue_time)
