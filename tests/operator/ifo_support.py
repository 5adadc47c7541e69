"""Helpers shared by the operator tests (imported by name: several conftest.py files exist under
tests/, so nothing imports `conftest` itself): paths, sample objects, polling, the operator
runner, fake worker /metrics servers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp.web
import kopf
import yaml
from ifo_emulator import Emulator
from inferfleet.operator import crd
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.handlers import build_registry

REPO = pathlib.Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
T = TypeVar("T")

ISVC = "inferfleet.io/v1alpha1/inferenceservices"
K8S_VERSIONS = ("1.30", "1.33")  # what kubernetes-validate checks objects against (tests/ship too)


def load_yaml_docs(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def cluster_role_rules() -> list[dict[str, Any]]:
    for doc in load_yaml_docs(MANIFESTS / "rbac.yaml"):
        if doc["kind"] == "ClusterRole":
            return list(doc["rules"])
    raise AssertionError("manifests/rbac.yaml has no ClusterRole")


def make_isvc(name: str = "llm", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A small CPU InferenceService; keyword arguments replace top-level spec fields."""
    base: dict[str, Any] = {
        "model": {"name": "tiny", "source": "tiny://llama"},
        "image": "registry.example.com/inferfleet-worker:0.1.0",
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 4,
        "autoscaling": {"enabled": False},
    }
    base.update(copy.deepcopy(spec))
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": base,
    }


async def eventually(
    probe: Callable[[], T | Awaitable[T]], *, timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = probe()
        last = await result if isinstance(result, Awaitable) else result
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(0.05)


async def holds_for(probe: Callable[[], Any], seconds: float, *, what: str = "condition") -> None:
    """Poll `probe` for `seconds`; fail as soon as it is falsy (the mirror of `eventually`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not probe():
            raise AssertionError(f"{what} stopped holding")
        await asyncio.sleep(0.05)


def operator_config(emu: Emulator, **overrides: Any) -> OperatorConfig:
    settings: dict[str, Any] = {
        "connection": kopf.ConnectionInfo(server=str(emu.url).rstrip("/"), token=emu.operator_token),
        "status_interval_s": 1.0,
        "resync_interval_s": 2.0,
    }
    settings.update(overrides)
    return OperatorConfig(**settings)


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig) -> AsyncIterator[None]:
    """The operator in this process: kopf.operator(), cluster-wide and standalone.

    It gets a thread and an event loop of its own, as kopf.testing.KopfRunner does: at shutdown
    kopf cancels every task created in its loop after it started, which would include pytest's.
    """
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        settings = kopf.OperatorSettings()
        settings.process.ultimate_exiting_timeout = None  # never SIGKILL the test process
        coro = kopf.operator(
            registry=build_registry(config),
            settings=settings,
            clusterwide=True,
            standalone=True,
            stop_flag=stop,
            ready_flag=ready,
        )
        try:
            asyncio.run(coro)
        except asyncio.CancelledError:
            pass  # kopf ends its root task by cancellation on a stop flag (kopf.run swallows it too)
        except BaseException as e:
            errors.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait, 20)
    if errors:
        raise errors[0]
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop within 30 s"
        if errors:
            raise errors[0]


class FakeWorker:
    """A real HTTP server on 127.0.0.1 serving /metrics in Prometheus text, load set by tests."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.running = 0.0
        self.fail = False
        self.url = ""
        self._runner: aiohttp.web.AppRunner | None = None

    def set_load(self, waiting: float, running: float = 0.0) -> None:
        self.waiting, self.running = waiting, running

    async def _metrics(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if self.fail:
            return aiohttp.web.Response(status=503, text="draining")
        body = (
            "# HELP inferfleet_requests_waiting Requests queued.\n"
            "# TYPE inferfleet_requests_waiting gauge\n"
            f'inferfleet_requests_waiting{{model_name="tiny"}} {self.waiting}\n'
            "# HELP inferfleet_requests_running Requests in the running batch.\n"
            "# TYPE inferfleet_requests_running gauge\n"
            f'inferfleet_requests_running{{model_name="tiny"}} {self.running}\n'
            "# TYPE inferfleet_kv_cache_usage_ratio gauge\n"
            "inferfleet_kv_cache_usage_ratio 0.25\n"
            "# TYPE inferfleet_ready gauge\n"
            "inferfleet_ready 1\n"
        )
        return aiohttp.web.Response(text=body, content_type="text/plain", charset="utf-8")

    async def start(self) -> FakeWorker:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/metrics"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def by_pod_name(urls: Mapping[str, str]) -> Callable[[Mapping[str, Any]], str | None]:
    """A metrics-URL resolver for the operator: pod name -> fake worker URL."""
    return lambda pod: urls.get(pod["metadata"]["name"])
