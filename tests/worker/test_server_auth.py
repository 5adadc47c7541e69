"""The optional API key: default-deny on everything but health, metrics and the schema; checked on
the raw request path (a forged Host header changes nothing); OpenAI-shaped 401s."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_helpers import MODEL, ServerThread

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(tiny_llama: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_llama, api_key=KEY) as s:
        yield s


def raw_request(port: int, request_line: str, headers: str = "Host: 127.0.0.1\r\n") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"{request_line}\r\n{headers}Connection: close\r\n\r\n".encode("utf-8", "surrogateescape")
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_public_routes_need_no_key(keyed: ServerThread) -> None:
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Bearer", "Basic czNjcmV0LWtleQ==", KEY, f"Bearer {KEY}x"]
)
def test_v1_denies_without_the_right_key(keyed: ServerThread, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    for r in (
        keyed.get("/v1/models", headers=headers),
        keyed.post("/v1/completions", json={"prompt": "x"}, headers=headers),
    ):
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and err["message"]


def test_the_right_key_works_with_the_official_client(keyed: ServerThread) -> None:
    r = keyed.openai(api_key=KEY).completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        keyed.openai(api_key="nope").models.list()


@pytest.mark.parametrize(
    ("request_line", "headers"),
    [
        # the Host header must not be able to make a protected path look public
        ("GET /v1/models HTTP/1.1", "Host: 127.0.0.1/health/live\r\n"),
        ("GET /v1/models HTTP/1.1", "Host: 127.0.0.1:1/metrics?\r\n"),
        ("GET /v1/models HTTP/1.1", "X-Forwarded-Host: x\r\nX-Original-URL: /health/live\r\nHost: h\r\n"),
        # path tricks: every one is either denied or not found, never served
        ("GET /v1/models/ HTTP/1.1", "Host: h\r\n"),
        ("GET //v1/models HTTP/1.1", "Host: h\r\n"),
        ("GET /health/live/../../v1/models HTTP/1.1", "Host: h\r\n"),
        ("GET /health/live/%2e%2e/%2e%2e/v1/models HTTP/1.1", "Host: h\r\n"),
        ("GET /%76%31/models HTTP/1.1", "Host: h\r\n"),
        ("GET http://127.0.0.1/health/live/../../v1/models HTTP/1.1", "Host: h\r\n"),
        ("GET /v1/models?/health/live HTTP/1.1", "Host: h\r\n"),
        ("GET /v1/models#/health/live HTTP/1.1", "Host: h\r\n"),
        ("GET /nope HTTP/1.1", "Host: h\r\n"),
        # a key that is not even UTF-8
        ("GET /v1/models HTTP/1.1", "Host: h\r\nAuthorization: Bearer \udcff\udcfe\r\n"),
    ],
)
def test_no_path_or_host_trick_gets_past_the_key(
    keyed: ServerThread, request_line: str, headers: str
) -> None:
    status, data = raw_request(keyed.server.port, request_line, headers)
    assert status in (400, 401, 404), data[:300]
    assert b'"data"' not in data  # never the model list


def test_no_key_configured_means_open(server: ServerThread) -> None:
    assert server.get("/v1/models").status_code == 200
