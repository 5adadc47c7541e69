"""`inferfleet-worker serve`: the OpenAI-compatible HTTP server (aiohttp) around the engine.

Lifecycle (the phase is what /health/ready reports):

    listening at once -> "loading" (weights) -> "warming_up" -> "ready"
                                       \\-> "dead" (load failed: the process exits 1)
    "ready" -> SIGTERM -> "draining": ready 503, new /v1 requests 503 + Retry-After, in-flight
               requests run to the end for up to --drain-timeout, then are aborted; exit 0
    "ready" -> a step raises -> "dead": live 503, every request 503

Middlewares, outermost first: errors (every failure becomes an OpenAI error object, never a
traceback), auth (default-deny: only the health, metrics and schema routes are public), gate
(/v1 answers 503 + Retry-After unless ready, and counts in-flight requests for the drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from . import schemas
from .admission import AdmissionControl
from .async_engine import AsyncEngine, GenerationStream
from .errors import InvalidRequestError
from .metrics import ServerMetrics
from .openapi import openapi_document
from .protocol import ApiError, error_body, model_not_found
from .responses import model_card, models_list
from .serving import RETRY_AFTER_UNAVAILABLE, OpenAIServing, json_response

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine import LLMEngine
    from .sampling_params import SamplingParams
    from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/metrics", "/openapi.json"})
RETRY_AFTER_LOADING = "5"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the bound one is logged and in WorkerServer.port)
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_queued_requests: int = 1024
    max_queued_tokens: int | None = None  # None: 8 x max_model_len, at least 2**20
    max_body_bytes: int = 4 * 2**20
    debug_load_delay: float = 0.0  # testing only: sleep before loading the weights


class WorkerServer:
    def __init__(
        self,
        engine_config: EngineConfig,
        config: ServerConfig | None = None,
        *,
        load_hook: Callable[[str], None] | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config = config or ServerConfig()
        self.model_name = engine_config.name
        # the one context bound (EngineConfig resolves it): the runner refuses to start with a KV
        # cache smaller than one max_model_len sequence, so the cache never imposes a lower one
        self.max_model_len: int = engine_config.max_model_len  # type: ignore[assignment]
        vocab = engine_config.model_config.vocab_size
        # token ids (prompts, stop_token_ids) are checked against the vocabulary: an id beyond it
        # would index past the logits inside the engine step
        self.schemas = {
            "chat": schemas.for_model(schemas.CHAT_REQUEST, vocab),
            "completion": schemas.for_model(schemas.COMPLETION_REQUEST, vocab),
        }
        self._openapi_doc = openapi_document(
            self.model_name, self.schemas["chat"], self.schemas["completion"]
        )
        self.phase = "loading"
        self.load_error: BaseException | None = None
        self._started_at = time.perf_counter() if started_at is None else started_at
        self._created = int(time.time())
        self._total_startup: float | None = None
        self._api_key_hash = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None
        max_tokens = config.max_queued_tokens or max(2**20, 8 * self.max_model_len)
        self.admission = AdmissionControl(config.max_queued_requests, max_tokens)
        self.metrics = ServerMetrics(
            snapshot=lambda: self.async_engine.snapshot,
            ready=lambda: self.phase == "ready",
            startup=self._startup_seconds,
            queued=lambda: self.admission.requests,
        )

        def build() -> LLMEngine:
            if config.debug_load_delay > 0:
                time.sleep(config.debug_load_delay)
            from .engine import LLMEngine

            return LLMEngine(engine_config)

        self.async_engine = AsyncEngine(build, self._on_phase, self.metrics, load_hook)
        self.streams: set[GenerationStream] = set()
        self.tokenizer: Tokenizer | None = None
        self._validate: Callable[[list[int], SamplingParams, str], None] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._load_failed = asyncio.Event()
        self.serving = OpenAIServing(self)
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self.port: int = config.port

    # -- state ---------------------------------------------------------------------------------

    def _on_phase(self, phase: str) -> None:
        """Engine thread -> event loop: loading progress, ready, or death."""
        if phase == "ready":
            engine = self.async_engine.engine
            assert engine is not None
            self.tokenizer = engine.tokenizer
            self._validate = engine.validate_prompt  # reads only immutable config: thread-safe
            self._total_startup = time.perf_counter() - self._started_at
            log.info("ready: %s (startup %.2fs)", self.model_name, self._total_startup)
        if phase == "dead":
            if self.phase in ("loading", "warming_up"):
                self.load_error = self.async_engine.dead
                self._load_failed.set()
            self.phase = "dead"
            return
        if self.phase != "draining":
            self.phase = phase

    def _startup_seconds(self) -> dict[str, float]:
        s = dict(self.async_engine.startup_seconds)  # load_weights, engine_init, warmup
        if self._total_startup is not None:
            s["total"] = self._total_startup
        return s

    def validate_prompt(self, ids: list[int], params: SamplingParams, param: str) -> None:
        assert self._validate is not None
        self._validate(ids, params, param)

    # -- app -----------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes,
            middlewares=[self._errors_mw, self._auth_mw, self._gate_mw],
        )
        r = app.router
        r.add_get("/health/live", self._live)
        r.add_get("/health/ready", self._ready)
        r.add_get("/metrics", self._metrics)
        r.add_get("/openapi.json", self._openapi)
        r.add_get("/v1/models", self._models)
        r.add_get("/v1/models/{model:.+}", self._model)  # served names may hold "/" (org/name)
        r.add_post("/v1/completions", self.serving.completions)
        r.add_post("/v1/chat/completions", self.serving.chat)
        return app

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (ApiError, InvalidRequestError) as e:
            err = e if isinstance(e, ApiError) else ApiError.from_invalid(e)
            return json_response(err.body(), err.status, err.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
            message = {
                404: f"no route for {request.method} {request.rel_url.path}",
                405: f"method {request.method} is not allowed on {request.rel_url.path}",
            }.get(e.status, e.reason)
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            return json_response(error_body(message, "invalid_request_error", None, code), e.status, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
            body = error_body("internal server error", "server_error", None, "internal_error")
            return json_response(body, 500)

    def _is_public(self, request: web.Request) -> bool:
        # both the raw request path and the route that actually matched must be public: nothing
        # derived from the Host header takes part (CVE-2026-48746 in vLLM did exactly that)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        return request.rel_url.path in PUBLIC_PATHS and canonical in PUBLIC_PATHS

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self._api_key_hash is None or self._is_public(request):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        # header bytes that are not UTF-8 arrive as surrogate escapes: hash them, don't crash
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, self._api_key_hash):
            message = (
                "Incorrect API key provided." if auth else "Missing API key (Authorization: Bearer ...)."
            )
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    @web.middleware
    async def _gate_mw(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is None or not resource.canonical.startswith("/v1/"):
            return await handler(request)
        if self.phase != "ready":
            self.metrics.rejected.labels(self.phase).inc()
            raise self._unavailable()
        self._inflight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _unavailable(self) -> ApiError:
        messages = {
            "loading": ("the model is still loading", RETRY_AFTER_LOADING),
            "warming_up": ("the model is warming up", RETRY_AFTER_LOADING),
            "draining": ("the server is shutting down", RETRY_AFTER_UNAVAILABLE),
            "dead": ("the engine has failed; this replica cannot serve", RETRY_AFTER_LOADING),
        }
        message, retry = messages.get(self.phase, ("not ready", RETRY_AFTER_LOADING))
        return ApiError(503, message, type="server_error", code=self.phase, headers={"Retry-After": retry})

    # -- plain routes --------------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return json_response({"phase": self.phase}, 503 if self.phase == "dead" else 200)

    async def _ready(self, request: web.Request) -> web.Response:
        if self.phase == "ready":
            return json_response({"phase": "ready"})
        return json_response(
            {"phase": self.phase}, 503, {"Retry-After": self._unavailable().headers["Retry-After"]}
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _openapi(self, request: web.Request) -> web.Response:
        return json_response(self._openapi_doc)

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(models_list(self.model_name, self._created, self.max_model_len))

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.model_name:
            raise model_not_found(name)
        return json_response(model_card(self.model_name, self._created, self.max_model_len))

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then load the model in the engine thread (the phase tells how far it got)."""
        self._runner = web.AppRunner(
            self.app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("inferfleet-worker listening on http://%s:%d", self.config.host, self.port)
        self.async_engine.start(asyncio.get_running_loop())

    async def drain(self, timeout: float | None = None, force: asyncio.Event | None = None) -> None:
        """Stop taking requests; let in-flight ones finish for up to `timeout` s, then abort them."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        if self.phase != "dead":
            self.phase = "draining"
        log.info("draining: %d request(s) in flight, up to %.1fs", self._inflight, timeout)
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if force is not None:
            waiters.append(asyncio.ensure_future(force.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not self._idle.is_set():
            log.warning("drain: aborting %d request(s) still running", len(self.streams))
            for s in list(self.streams):
                s.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.async_engine.shutdown()
        self.serving.close()

    async def run_until_signal(self) -> int:
        """The `serve` command: start, wait for SIGTERM/SIGINT (or a failed load), drain, stop.

        Returns the exit code: 0 after a drain, 1 when the model could not be loaded. A second
        signal during the drain aborts what is still running.
        """
        loop = asyncio.get_running_loop()
        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal(signame: str) -> None:
            if stop.is_set():
                log.warning("%s again: aborting in-flight requests", signame)
                force.set()
            else:
                log.info("%s: draining", signame)
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            await self.start()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._load_failed.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self._load_failed.is_set() and not stop.is_set():
                log.error("the model could not be loaded: %s", self.load_error)
                return 1
            await self.drain(force=force)
            return 0
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run(engine_config: EngineConfig, config: ServerConfig, started_at: float | None = None) -> int:
    async def main() -> int:
        return await WorkerServer(engine_config, config, started_at=started_at).run_until_signal()

    return asyncio.run(main())
