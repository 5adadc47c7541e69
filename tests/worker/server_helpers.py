"""Real worker servers for tests: in-process (own event loop on a thread) or as a subprocess.

Both listen on 127.0.0.1 with port 0 (the kernel picks a free port; no fixed ports). Helpers poll
with deadlines; nothing here sleeps to synchronize.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")
MODEL = "tiny-llama"  # the served model name of every test server


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> T:
    """Poll `pred` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, OSError) as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}: last error {last_exc!r}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v"}': value} (labels sorted), plus bare names."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class _Client:
    url: str

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kw)

    def metrics(self) -> dict[str, float]:
        r = self.get("/metrics")
        assert r.status_code == 200
        return parse_metrics(r.text)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def openai(self, api_key: str = "none", **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kw)

    def async_openai(self, api_key: str = "none", **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kw)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.get("/health/ready").status_code == 200, timeout, what="ready")


class ServerThread(_Client):
    """A WorkerServer on its own event loop in a daemon thread. Use as a context manager."""

    def __init__(
        self,
        model: Path,
        *,
        wait_ready: bool = True,
        load_hook: Callable[[str], None] | None = None,
        engine: dict[str, Any] | None = None,
        **server: Any,
    ) -> None:
        from inferfleet.worker.config import EngineConfig
        from inferfleet.worker.server import ServerConfig

        engine = {"served_model_name": MODEL, "device": "cpu", "dtype": "float32", **(engine or {})}
        self._engine_config = EngineConfig(model=str(model), **engine)
        self._config = ServerConfig(host="127.0.0.1", port=0, **server)
        self._load_hook = load_hook
        self._wait_ready = wait_ready
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def __enter__(self) -> ServerThread:
        from inferfleet.worker.server import WorkerServer

        self._thread.start()

        async def make() -> WorkerServer:
            srv = WorkerServer(self._engine_config, self._config, load_hook=self._load_hook)
            await srv.start()
            return srv

        self.server = self.call(make())
        self.url = f"http://127.0.0.1:{self.server.port}"
        if self._wait_ready:
            self.wait_ready()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.drain(timeout=0))
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


_LISTEN = re.compile(r"listening on http://([\d.]+):(\d+)")


class ServerProcess(_Client):
    """`inferfleet-worker serve` in a subprocess; its log goes to a file the tests can read."""

    def __init__(self, model: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        cmd = [sys.executable, "-m", "inferfleet.worker.cli", "serve", "--model", str(model)]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--dtype", "float32"]
        cmd += ["--served-model-name", MODEL, *args]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        m = wait_until(self._listening, 60, 0.02, "the server to listen")
        self.url = f"http://{m.group(1)}:{m.group(2)}"

    def _listening(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        return _LISTEN.search(self.log_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
