"""Load behaviour: a shared batch under 32 concurrent streams, client disconnects that free their
KV blocks, and a bounded queue that answers 429 + Retry-After and then serves normally again."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from server_helpers import MODEL, ServerThread, wait_until

IGNORE_EOS = {"ignore_eos": True}


def test_32_concurrent_streams_share_the_batch(server: ServerThread) -> None:
    prompts = [f"Request number {i}: the operator watches the queue" for i in range(32)]
    client = server.openai()
    # references, one at a time (greedy, so the batch must not change a single token)
    expected = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=48,
            temperature=0.0,
            extra_body=IGNORE_EOS,
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    peak = {"running": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            m = server.metrics()
            peak["running"] = max(peak["running"], m["inferfleet_requests_running"])

    async def one(aclient: Any, p: str) -> tuple[str, str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=48,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        text, reason, used = "", None, -1
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
            if c.usage:
                used = c.usage.completion_tokens
        return text, reason, used

    async def main() -> list[tuple[str, str | None, int]]:
        aclient = server.async_openai()
        try:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
        finally:
            await aclient.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    assert [r[0] for r in results] == expected
    assert all(r[1] == "length" and r[2] == 48 for r in results)
    assert peak["running"] > 1, "the metrics never showed two requests in one batch"


async def _stream_then_vanish(url: str, body: dict[str, Any], chunks: int) -> None:
    """Read `chunks` SSE events, then drop the connection without reading further."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200
        seen = 0
        async for line in r.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen >= chunks:
                    break
    # leaving the context managers closes the connection mid-stream


def _idle(server: ServerThread) -> bool:
    m = server.metrics()
    return (
        m["inferfleet_requests_running"] == 0
        and m["inferfleet_requests_waiting"] == 0
        and m["inferfleet_kv_cache_usage_ratio"] == 0.0
    )


def test_disconnect_mid_stream_frees_the_engine(server: ServerThread) -> None:
    wait_until(lambda: _idle(server), 5, what="an idle server")
    aborted_before = server.metrics().get('inferfleet_requests_total{finish_reason="abort"}', 0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 4000,
        "stream": True,
        **IGNORE_EOS,
    }
    asyncio.run(_stream_then_vanish(server.url + "/v1/chat/completions", body, chunks=5))
    t0 = time.monotonic()
    wait_until(lambda: _idle(server), 2.0, 0.005, "running/waiting 0 and KV usage idle after a disconnect")
    assert time.monotonic() - t0 < 2.0
    m = server.metrics()
    assert m['inferfleet_requests_total{finish_reason="abort"}'] == aborted_before + 1
    assert server.on_loop(lambda: server.server.admission.requests) == 0


def test_disconnect_while_waiting_for_a_non_streamed_reply(server: ServerThread) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Keep going", "max_tokens": 4000, **IGNORE_EOS}).encode()
    with socket.create_connection(("127.0.0.1", server.server.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: server.metrics()["inferfleet_requests_running"] == 1, 5, what="the request to run")
    wait_until(lambda: _idle(server), 2.0, 0.005, "the engine to drop the request of a closed connection")


def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, str], Any]]:
    async def one(s: aiohttp.ClientSession, b: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        async with s.post(url, json=b) as r:
            return r.status, dict(r.headers), await r.json()

    async def main() -> list[tuple[int, dict[str, str], Any]]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(one(s, b) for b in bodies))

    return asyncio.run(main())


def test_overload_gets_429_with_retry_after_then_normal_service(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama, engine={"max_num_seqs": 2}, max_queued_requests=4) as srv:
        url = srv.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "Queue me", "max_tokens": 16, **IGNORE_EOS}
        # hold the engine still so that nothing leaves the queue: exactly 4 fit
        srv.on_loop(srv.server.async_engine.pause)
        results: list[Any] = []
        burst = threading.Thread(target=lambda: results.extend(_post_all(url, [body] * 12)))
        burst.start()
        wait_until(
            lambda: srv.metrics().get('inferfleet_requests_rejected_total{reason="queue_full"}', 0) == 8,
            10,
            what="8 rejections",
        )
        assert srv.metrics()["inferfleet_admission_queued_requests"] == 4
        srv.on_loop(srv.server.async_engine.resume)
        burst.join(30)
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] * 4 + [429] * 8
        for status, headers, payload in results:
            if status == 429:
                assert headers["Retry-After"] == "1"
                assert (
                    payload["error"]["code"] == "queue_full"
                    and payload["error"]["type"] == "rate_limit_error"
                )
            else:
                assert payload["usage"]["completion_tokens"] == 16
        # afterwards: normal service, and a fresh burst within the limit is all 200
        after = _post_all(url, [body] * 4)
        assert [r[0] for r in after] == [200] * 4
        assert srv.metrics()["inferfleet_admission_queued_requests"] == 0


def test_queued_token_budget(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama, max_queued_tokens=50) as srv:
        url = srv.url + "/v1/completions"
        big = {"model": MODEL, "prompt": list(range(3, 83)), "max_tokens": 4}  # 80 tokens > budget
        small = {"model": MODEL, "prompt": list(range(3, 13)), "max_tokens": 4}
        srv.on_loop(srv.server.async_engine.pause)
        results: list[Any] = []
        # the big one goes alone into an empty queue (never starved); the small one then does not fit
        first = threading.Thread(target=lambda: results.extend(_post_all(url, [big])))
        first.start()
        wait_until(lambda: srv.metrics()["inferfleet_admission_queued_requests"] == 1, 5, what="queued")
        ((status, headers, _),) = _post_all(url, [small])
        assert status == 429 and headers["Retry-After"] == "1"
        srv.on_loop(srv.server.async_engine.resume)
        first.join(30)
        assert results[0][0] == 200
        assert _post_all(url, [small])[0][0] == 200
