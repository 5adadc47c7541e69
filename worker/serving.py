"""The two generation endpoints: /v1/completions and /v1/chat/completions.

Order of work for one request (cheap checks first, so an overloaded or abused server spends
nothing on requests it will refuse):

    read body (413/415) -> parse + schema (400) -> model (404) -> reserve admission (429)
    -> template + tokenize (tokenizer threads) -> context checks (400) -> exact admission (429)
    -> engine -> JSON response, or SSE chunks as tokens arrive

Whatever way the handler ends (done, error, client gone: aiohttp cancels the handler), the
`finally` aborts the unfinished engine requests, so their KV blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from . import protocol, responses
from .admission import Ticket
from .errors import EngineDeadError, InvalidRequestError
from .protocol import ApiError, GenerateRequest, model_not_found
from .responses import ResponseHeader

if TYPE_CHECKING:
    from .async_engine import GenerationStream
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams
    from .server import WorkerServer

log = logging.getLogger(__name__)

RETRY_AFTER_QUEUE_FULL = "1"
RETRY_AFTER_UNAVAILABLE = "1"


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    text = json.dumps(body, ensure_ascii=False, allow_nan=False)
    return web.Response(text=text, status=status, headers=headers, content_type="application/json")


async def read_json(request: web.Request, max_bytes: int) -> dict[str, Any]:
    if request.headers.get(hdrs.CONTENT_TYPE) is not None:
        mime = request.content_type
        if mime != "application/json" and not mime.endswith("+json"):
            raise ApiError(
                415,
                f"Content-Type must be application/json, got {mime!r}",
                code="unsupported_media_type",
            )
    too_large = ApiError(413, f"the request body exceeds {max_bytes} bytes", code="request_too_large")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    return protocol.parse_json_body(raw)


class _Aborted(Exception):
    """The engine aborted the request (drain timeout) while the client was still there."""


def _aborted_error() -> ApiError:
    return ApiError(
        503,
        "the request was aborted: the server is shutting down",
        type="server_error",
        code="aborted",
        headers={"Retry-After": RETRY_AFTER_UNAVAILABLE},
    )


def _dead_error(e: EngineDeadError) -> ApiError:
    return ApiError(
        503, str(e), type="server_error", code="engine_dead", headers={"Retry-After": RETRY_AFTER_UNAVAILABLE}
    )


def _usage(
    req: GenerateRequest, prompts: list[list[int]], completion_tokens: list[int], cached: list[int]
) -> dict[str, Any]:
    """The usage object from per-choice counts; a prompt's cached tokens count once (its first
    choice's), as its prompt tokens do."""
    prompt_cached = sum(cached[p * req.n] for p in range(len(prompts)))
    return responses.usage(sum(map(len, prompts)), sum(completion_tokens), prompt_cached)


class OpenAIServing:
    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        schema = self.server.schemas["chat"]
        return await self._generate(request, lambda body: protocol.parse_chat(body, schema))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        schema = self.server.schemas["completion"]
        return await self._generate(request, lambda body: protocol.parse_completion(body, schema))

    # -- one request ---------------------------------------------------------------------------

    async def _generate(
        self, request: web.Request, parse: Callable[[dict[str, Any]], GenerateRequest]
    ) -> web.StreamResponse:
        arrival = time.monotonic()
        srv = self.server
        req = parse(await read_json(request, srv.config.max_body_bytes))
        if req.model is not None and req.model != srv.model_name:
            raise model_not_found(req.model)
        estimate = [t for t in req.estimated_prompt_tokens() for _ in range(req.n)]
        ticket = srv.admission.try_reserve(estimate)
        if ticket is None:
            raise self._queue_full()
        stream: GenerationStream | None = None
        try:
            loop = asyncio.get_running_loop()
            prompts = await loop.run_in_executor(self._pool, self._tokenize, req)
            base = uuid.uuid4().hex
            engine_requests = self._plan(req, prompts, base)
            if not ticket.resize([len(ids) for ids in prompts for _ in range(req.n)]):
                raise self._queue_full()
            try:
                stream = srv.async_engine.submit(engine_requests, arrival)
            except EngineDeadError as e:
                raise _dead_error(e) from None
            srv.streams.add(stream)
            header = ResponseHeader(
                id=("chatcmpl-" if req.kind == "chat" else "cmpl-") + base, model=srv.model_name
            )
            if req.stream:
                return await self._stream(request, req, header, prompts, stream, ticket)
            return await self._collect(req, header, prompts, stream, ticket)
        finally:
            ticket.release()
            if stream is not None:
                stream.abort()
                srv.streams.discard(stream)

    def _queue_full(self) -> ApiError:
        self.server.metrics.rejected.labels("queue_full").inc()
        return ApiError(
            429,
            "the server's request queue is full; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": RETRY_AFTER_QUEUE_FULL},
        )

    def _tokenize(self, req: GenerateRequest) -> list[list[int]]:
        """Runs in a tokenizer thread (the tokenizer is thread-safe; the engine is not touched)."""
        tok = self.server.tokenizer
        if req.kind == "chat":
            return [tok.encode_chat(req.messages)]
        return [list(p) if isinstance(p, list) else (tok.encode(p) if p else []) for p in req.prompts]

    def _plan(
        self, req: GenerateRequest, prompts: list[list[int]], base: str
    ) -> list[tuple[str, list[int], SamplingParams]]:
        """Check every prompt against the context and build one engine request per choice
        (ids `{base}-{i}`). The choices of a prompt differ only in their seed, which never fails a
        check: the prompt is validated once, with its first choice's params."""
        srv = self.server
        limit = srv.max_model_len
        param = "messages" if req.kind == "chat" else "prompt"
        out: list[tuple[str, list[int], SamplingParams]] = []
        opts = req.sampling
        for p, ids in enumerate(prompts):
            if len(ids) >= limit:
                raise protocol.bad_request(
                    f"This model's maximum context length is {limit} tokens, but the {param} has "
                    f"{len(ids)} tokens (at least one token must be left to generate).",
                    param=param,
                    code="context_length_exceeded",
                )
            max_tokens = opts.max_tokens if opts.max_tokens is not None else limit - len(ids)
            try:
                first = opts.params(max_tokens)
                srv.validate_prompt(ids, first, param)
                choices = [first, *(opts.params(max_tokens, index=j) for j in range(1, req.n))]
            except InvalidRequestError as e:
                named = opts.max_tokens_param  # the field the user set (chat: max_completion_tokens)
                if e.param == "max_tokens" and named != "max_tokens":
                    e.param, e.message = named, e.message.replace("max_tokens", named)
                raise ApiError.from_invalid(e) from None
            out += [(f"{base}-{p * req.n + j}", ids, params) for j, params in enumerate(choices)]
        return out

    # -- responses -----------------------------------------------------------------------------

    async def _collect(
        self,
        req: GenerateRequest,
        h: ResponseHeader,
        prompts: list[list[int]],
        stream: GenerationStream,
        ticket: Ticket,
    ) -> web.Response:
        finals: list[RequestOutput | None] = [None] * req.num_choices
        try:
            async for idx, out in stream:
                ticket.release_part(idx)
                if out.finished:
                    finals[idx] = out
        except EngineDeadError as e:
            raise _dead_error(e) from None
        if any(o is None or o.finish_reason == "abort" for o in finals):
            raise _aborted_error()
        done = [o for o in finals if o is not None]
        choices = []
        token_bytes = self.server.tokenizer.token_bytes
        for idx, o in enumerate(done):
            if req.kind == "chat":
                lp = responses.chat_logprobs(o.logprobs, token_bytes) if o.logprobs is not None else None
                choices.append(responses.chat_choice(idx, o, lp))
            else:
                lp = (
                    responses.completion_logprobs(o.logprobs, token_bytes) if o.logprobs is not None else None
                )
                choices.append(responses.completion_choice(idx, o.text, lp, o.finish_reason))
        usage = _usage(req, prompts, [len(o.token_ids) for o in done], [o.num_cached_tokens for o in done])
        build = responses.chat_response if req.kind == "chat" else responses.completion_response
        return json_response(build(h, choices, usage), headers={"X-Request-Id": h.id})

    async def _stream(
        self,
        request: web.Request,
        req: GenerateRequest,
        h: ResponseHeader,
        prompts: list[list[int]],
        stream: GenerationStream,
        ticket: Ticket,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Request-Id": h.id,
            }
        )
        await resp.prepare(request)
        chat = req.kind == "chat"
        usage_on = req.include_usage
        completion_tokens = [0] * req.num_choices
        cached = [0] * req.num_choices
        token_bytes = self.server.tokenizer.token_bytes
        # completions' text_offset, carried over the stream (only completions report it)
        want_offsets = not chat and req.sampling.logprobs is not None
        offsets = [responses.TextOffsets() for _ in range(req.num_choices)] if want_offsets else []
        try:
            if chat:
                for idx in range(req.num_choices):
                    delta = {"role": "assistant", "content": ""}
                    await resp.write(
                        responses.sse(responses.chat_chunk(h, idx, delta, include_usage=usage_on))
                    )
            async for idx, out in stream:
                ticket.release_part(idx)
                if out.finish_reason == "abort":
                    raise _Aborted
                reason = out.finish_reason  # None until the choice finishes
                if not (out.new_text or out.new_logprobs or reason):
                    continue  # text held back (partial UTF-8 or a possible stop string)
                completion_tokens[idx] = out.num_output_tokens
                cached[idx] = out.num_cached_tokens
                lp = None
                if chat:
                    if out.new_logprobs:
                        lp = responses.chat_logprobs(out.new_logprobs, token_bytes)
                    delta = {"content": out.new_text} if out.new_text else {}
                    chunk = responses.chat_chunk(
                        h, idx, delta, logprobs=lp, reason=reason, include_usage=usage_on
                    )
                else:
                    if want_offsets:
                        lp = responses.completion_logprobs(out.new_logprobs, token_bytes, offsets[idx])
                    chunk = responses.completion_chunk(
                        h, idx, out.new_text, logprobs=lp, reason=reason, include_usage=usage_on
                    )
                await resp.write(responses.sse(chunk))
            if usage_on:
                usage = _usage(req, prompts, completion_tokens, cached)
                await resp.write(responses.sse(responses.usage_chunk(h, req.kind, usage)))
            await resp.write(responses.SSE_DONE)
        except ConnectionResetError:
            pass  # the client is gone: nothing to write; the caller's `finally` aborts
        except Exception as e:  # (CancelledError is not an Exception: it goes up untouched)
            await self._stream_error(resp, e)
        return resp

    async def _stream_error(self, resp: web.StreamResponse, e: Exception) -> None:
        """After the 200 went out, an error can only be an SSE event; then the stream ends."""
        if isinstance(e, EngineDeadError):
            err = _dead_error(e)
        elif isinstance(e, _Aborted):
            err = _aborted_error()
        elif isinstance(e, ApiError):
            err = e
        else:
            log.exception("error while streaming")
            err = ApiError(500, "internal error while streaming", type="server_error", code="internal_error")
        with contextlib.suppress(ConnectionResetError):
            await resp.write(responses.sse(err.body(), event="error"))
