"""Bad input never reaches the engine and never yields a 5xx: a table of malformed requests, each
with its 4xx and the `param` it must name; a bounded schemathesis run against /openapi.json;
routing errors as JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from server_helpers import MODEL, ServerThread

MAX_BODY = 64 * 1024
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def small(tiny_llama: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_llama, engine={"max_model_len": MAX_MODEL_LEN}, max_body_bytes=MAX_BODY) as s:
        yield s


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
MSG = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    id: str
    body: Any  # dict: sent as JSON; bytes: sent raw
    status: int
    param: str | None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None
    says: str | None = None  # a part of the message


def chat(**kw: Any) -> dict[str, Any]:
    return {**CHAT, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {**COMP, **kw}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


C = "/v1/completions"
CASES = [
    # bodies that are not a JSON object
    Case("invalid-json", b'{"messages": [', 400, None, code="invalid_json"),
    Case("not-an-object", b"[1, 2]", 400, None, code="invalid_json"),
    Case("empty-body", b"", 400, None, code="invalid_json"),
    Case("nan-literal", b'{"messages": [], "temperature": NaN}', 400, None, code="invalid_json"),
    Case("not-utf8", b'{"prompt": "\xff\xfe"}', 400, None, path=C, code="invalid_json"),
    Case("lone-surrogate", b'{"prompt": ["ok", "\\ud800"]}', 400, "prompt[1]", path=C),
    Case("deep-nesting", b"[" * 30000, 400, None, code="invalid_json"),
    Case(
        "wrong-content-type",
        json.dumps(CHAT).encode(),
        415,
        None,
        headers={"Content-Type": "text/plain"},
        code="unsupported_media_type",
    ),
    Case(
        "oversized-body",
        chat(messages=[{"role": "user", "content": "x" * MAX_BODY}]),
        413,
        None,
        code="request_too_large",
    ),
    # messages
    Case("missing-messages", without(CHAT, "messages"), 400, "messages"),
    Case("messages-null", chat(messages=None), 400, "messages"),
    Case("messages-string", chat(messages="hi"), 400, "messages"),
    Case("messages-empty", chat(messages=[]), 400, "messages"),
    Case("messages-too-many", chat(messages=MSG * 2000), 400, "messages"),
    Case("message-not-object", chat(messages=["hi"]), 400, "messages[0]"),
    Case("message-missing-role", chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    Case(
        "message-unknown-role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"
    ),
    Case("message-tool-role", chat(messages=[{"role": "tool", "content": "hi"}]), 400, "messages[0].role"),
    Case("message-missing-content", chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    Case("content-number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    Case(
        "content-image-part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
    ),
    Case(
        "message-extra-field", chat(messages=[{"role": "user", "content": "a", "x": 1}]), 400, "messages[0].x"
    ),
    Case(
        "prompt-beyond-context",
        chat(messages=[{"role": "user", "content": "word " * 200}]),
        400,
        "messages",
        code="context_length_exceeded",
    ),
    # sampling fields: wrong types, out of range, huge, negative
    Case("temperature-string", chat(temperature="hot"), 400, "temperature"),
    Case("temperature-negative", chat(temperature=-1), 400, "temperature"),
    Case("temperature-huge", chat(temperature=1e9), 400, "temperature"),
    Case("top-p-zero", chat(top_p=0), 400, "top_p"),
    Case("top-p-above-one", chat(top_p=1.5), 400, "top_p"),
    Case("top-k-negative", chat(top_k=-5), 400, "top_k"),
    Case("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens"),
    Case("max-tokens-negative", chat(max_tokens=-5), 400, "max_tokens"),
    Case("max-tokens-float", chat(max_tokens=1.5), 400, "max_tokens"),
    Case("max-tokens-bool", chat(max_tokens=True), 400, "max_tokens"),
    Case("max-tokens-huge", chat(max_tokens=10**12), 400, "max_tokens", code="context_length_exceeded"),
    Case(
        "max-completion-tokens-huge",
        chat(max_completion_tokens=10**6),
        400,
        "max_completion_tokens",
        code="context_length_exceeded",
        says="reduce the length of the prompt or max_completion_tokens",
    ),
    Case("min-tokens-over-max", chat(min_tokens=10), 400, "min_tokens"),
    Case("n-zero", chat(n=0), 400, "n"),
    Case("n-huge", chat(n=1000), 400, "n"),
    Case("seed-string", chat(seed="abc"), 400, "seed"),
    Case("seed-beyond-int64", chat(seed=2**70), 400, "seed"),
    Case("stop-number", chat(stop=5), 400, "stop"),
    Case("stop-too-many", chat(stop=["x"] * 100), 400, "stop"),
    Case("stop-empty-string", chat(stop=""), 400, "stop"),
    Case("stop-token-ids-strings", chat(stop_token_ids=["a"]), 400, "stop_token_ids[0]"),
    # an id beyond the vocabulary would index past the logits inside the engine step
    Case("stop-token-id-beyond-vocab", chat(stop_token_ids=[10**6], min_tokens=1), 400, "stop_token_ids[0]"),
    Case("ignore-eos-string", chat(ignore_eos="no"), 400, "ignore_eos"),
    Case("logprobs-string", chat(logprobs="yes"), 400, "logprobs"),
    Case("top-logprobs-too-many", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    Case("top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    Case("stream-string", chat(stream="true"), 400, "stream"),
    Case(
        "stream-options-without-stream", chat(stream_options={"include_usage": True}), 400, "stream_options"
    ),
    Case("stream-options-unknown", chat(stream=True, stream_options={"x": 1}), 400, "stream_options.x"),
    Case("user-number", chat(user=5), 400, "user"),
    Case("unknown-field", chat(frobnicate=1), 400, "frobnicate"),
    Case("presence-penalty", chat(presence_penalty=0.5), 400, "presence_penalty"),
    Case("logit-bias", chat(logit_bias={"5": 10}), 400, "logit_bias"),
    Case("tools", chat(tools=[{"type": "function"}]), 400, "tools"),
    Case("response-format-json", chat(response_format={"type": "json_object"}), 400, "response_format.type"),
    Case("model-number", chat(model=5), 400, "model"),
    Case("model-unknown", chat(model="gpt-4"), 404, "model", code="model_not_found"),
    # completions
    Case("missing-prompt", without(COMP, "prompt"), 400, "prompt", path=C),
    Case("prompt-number", comp(prompt=5), 400, "prompt", path=C, says="or an array of arrays of integers"),
    Case("prompt-empty-list", comp(prompt=[]), 400, "prompt", path=C),
    Case("prompt-empty-string", comp(prompt=""), 400, "prompt", path=C),
    Case("prompt-mixed-list", comp(prompt=["a", 1]), 400, "prompt", path=C),
    Case("prompt-token-out-of-vocab", comp(prompt=[99999]), 400, "prompt", path=C),
    Case("prompt-token-negative", comp(prompt=[-1, 2]), 400, "prompt", path=C),
    Case("prompt-batch-too-big", comp(prompt=["a"] * 40), 400, "prompt", path=C),
    Case("choices-too-many", comp(prompt=["a"] * 32, n=3), 400, "n", path=C),
    Case(
        "prompt-too-long",
        comp(prompt=list(range(3, 3 + MAX_MODEL_LEN))),
        400,
        "prompt",
        path=C,
        code="context_length_exceeded",
    ),
    Case("completion-logprobs-huge", comp(logprobs=100), 400, "logprobs", path=C),
    Case("completion-logprobs-bool", comp(logprobs=True), 400, "logprobs", path=C),
    Case("echo", comp(echo=True), 400, "echo", path=C),
    Case("best-of", comp(best_of=3), 400, "best_of", path=C),
    Case("suffix", comp(suffix="abc"), 400, "suffix", path=C),
    Case("chat-field-on-completions", comp(messages=MSG), 400, "messages", path=C),
    # routing
    Case("wrong-method", None, 405, None, method="GET", code="method_not_allowed"),
    Case("unknown-route", CHAT, 404, None, path="/v1/nope", code="not_found"),
]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request(small: ServerThread, case: Case) -> None:
    kw: dict[str, Any] = {"headers": dict(case.headers)}
    if isinstance(case.body, bytes):
        kw["content"] = case.body
        kw["headers"].setdefault("Content-Type", "application/json")
    elif case.body is not None:
        kw["json"] = case.body
    import httpx2

    r = httpx2.request(case.method, small.url + case.path, timeout=30, **kw)
    assert r.status_code == case.status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == case.param, err
    assert err["message"] and err["type"] == "invalid_request_error"
    if case.code is not None:
        assert err["code"] == case.code
    if case.says is not None:
        assert case.says in err["message"], err["message"]
    if case.status == 405:
        assert r.headers["Allow"] == "POST"


def test_the_server_still_serves_after_the_table(small: ServerThread) -> None:
    r = small.openai().chat.completions.create(**CHAT)
    assert r.usage.completion_tokens >= 1
    m = small.metrics()
    assert m["inferfleet_requests_running"] == m["inferfleet_requests_waiting"] == 0
    assert small.on_loop(lambda: small.server.admission.requests) == 0


def test_schemathesis_finds_no_server_error(small: ServerThread, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(exe),
        "run",
        small.url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "1",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report",
        "ndjson",
        "--report-dir",
        str(tmp_path),
    ]
    generated_before = small.metrics()["inferfleet_generation_tokens_total"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert re.search(r"\d+ generated, \d+ passed", p.stdout), p.stdout[-3000:]
    # the fuzzer got requests through to the engine, and the engine survived them all
    assert small.metrics()["inferfleet_generation_tokens_total"] > generated_before
    assert small.get("/health/live").status_code == 200
    assert small.get("/health/ready").status_code == 200
