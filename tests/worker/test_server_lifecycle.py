"""Lifecycle in-process: readiness during a held-open load, the drain (finish, or abort at the
deadline), a failed load, and an engine that dies mid-stream (fault injection)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from server_helpers import MODEL, ServerThread, wait_until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Gates:
    """A load hook that holds each loading phase open until the test releases it."""

    def __init__(self) -> None:
        self.gates = {"loading": threading.Event(), "warming_up": threading.Event()}

    def __call__(self, phase: str) -> None:
        assert self.gates[phase].wait(30), f"{phase} gate never opened"


def _expect_phase(s: ServerThread, phase: str) -> None:
    live, ready = s.get("/health/live"), s.get("/health/ready")
    assert live.status_code == 200 and live.json() == {"phase": phase}
    assert ready.status_code == 503 and ready.json() == {"phase": phase}
    assert ready.headers["Retry-After"]
    for r in (s.get("/v1/models"), s.post("/v1/chat/completions", json=CHAT)):
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["error"]["code"] == phase
    m = s.metrics()
    assert m["inferfleet_ready"] == 0


def test_readiness_during_a_slow_load(tiny_llama: Path) -> None:
    gates = Gates()
    with ServerThread(tiny_llama, wait_ready=False, load_hook=gates) as s:
        wait_until(lambda: s.get("/health/live").json()["phase"] == "loading", 5)
        _expect_phase(s, "loading")
        gates.gates["loading"].set()
        wait_until(lambda: s.get("/health/live").json()["phase"] == "warming_up", 5)
        _expect_phase(s, "warming_up")
        gates.gates["warming_up"].set()
        s.wait_ready(10)
        assert s.get("/health/ready").json() == {"phase": "ready"}
        assert s.openai().chat.completions.create(**CHAT).usage.completion_tokens >= 1
        m = s.metrics()
        assert m["inferfleet_ready"] == 1
        for phase in ("load_weights", "warmup", "total"):
            assert m[f'inferfleet_startup_seconds{{phase="{phase}"}}'] > 0
        assert (
            m['inferfleet_startup_seconds{phase="total"}'] >= m['inferfleet_startup_seconds{phase="warmup"}']
        )


def test_failed_load_is_dead_not_ready(tmp_path: Path, tiny_llama: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with ServerThread(broken, wait_ready=False) as s:
        wait_until(lambda: s.get("/health/live").status_code == 503, 10, what="live 503")
        assert s.get("/health/ready").json() == {"phase": "dead"}
        assert s.server.load_error is not None
        r = s.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "dead"


async def _read_stream(url: str, body: dict[str, Any], started: threading.Event) -> list[dict[str, Any]]:
    """All SSE events of one streamed request (data payloads; an error event is marked)."""
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200
        event = None
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                started.set()
                data = line[6:]
                events.append({"done": True} if data == "[DONE]" else {"event": event, **json.loads(data)})
                event = None
    return events


def _stream_in_thread(url: str, body: dict[str, Any]) -> tuple[threading.Thread, list[Any], threading.Event]:
    started, out = threading.Event(), []
    t = threading.Thread(target=lambda: out.append(asyncio.run(_read_stream(url, body, started))))
    t.start()
    assert started.wait(10)
    return t, out, started


LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Go on forever."}],
    "max_tokens": 4000,
    "stream": True,
    "ignore_eos": True,
}


def test_drain_finishes_in_flight_requests(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama) as s:
        body = {**LONG, "max_tokens": 1500}
        t, out, _ = _stream_in_thread(s.url + "/v1/chat/completions", body)
        drain = asyncio.run_coroutine_threadsafe(s.server.drain(timeout=30), s.loop)
        wait_until(lambda: s.get("/health/ready").status_code == 503, 2)
        assert t.is_alive(), "the stream must still be running while the server drains"
        assert s.get("/health/ready").json() == {"phase": "draining"}
        assert s.get("/health/live").status_code == 200
        r = s.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "draining"
        drain.result(30)
        t.join(10)
        events = out[0]
        assert events[-1] == {"done": True}
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert len(text) > 0


def test_drain_timeout_aborts_with_an_sse_error(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama) as s:
        t, out, _ = _stream_in_thread(s.url + "/v1/chat/completions", LONG)
        s.call(s.server.drain(timeout=0.2))
        t.join(10)
        events = out[0]
        assert events[-1]["event"] == "error"
        assert events[-1]["error"]["code"] == "aborted" and events[-1]["error"]["type"] == "server_error"
        assert {"done": True} not in events
        wait_until(lambda: s.metrics()["inferfleet_kv_cache_usage_ratio"] == 0.0, 2)


def test_engine_death_fails_streams_and_turns_live_red(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama) as s:
        t, out, _ = _stream_in_thread(s.url + "/v1/chat/completions", LONG)
        client = s.openai()
        pending: list[Any] = []

        def non_streamed() -> None:
            try:
                client.completions.create(
                    model=MODEL, prompt="x", max_tokens=4000, extra_body={"ignore_eos": True}
                )
            except openai.APIStatusError as e:
                pending.append(e)

        nt = threading.Thread(target=non_streamed)
        nt.start()
        wait_until(lambda: s.metrics()["inferfleet_requests_running"] == 2, 5)
        engine = s.server.async_engine.engine

        def broken_step() -> list[Any]:
            raise RuntimeError("simulated illegal memory access")

        engine.step = broken_step  # type: ignore[method-assign]
        t.join(10)
        nt.join(10)
        err = out[0][-1]
        assert err["event"] == "error" and err["error"]["code"] == "engine_dead"
        assert "Traceback" not in json.dumps(err)
        assert pending[0].status_code == 503 and pending[0].body["code"] == "engine_dead"
        wait_until(lambda: s.get("/health/live").status_code == 503, 2)
        assert s.get("/health/ready").json() == {"phase": "dead"}
        r = s.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["Retry-After"]
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**CHAT)
