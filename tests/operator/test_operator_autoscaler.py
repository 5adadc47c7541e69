"""The autoscaler end to end: fake worker /metrics servers on loopback (real HTTP, Prometheus
text), the operator scraping them, and spec.replicas moving through the scale subresource."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from ifo_emulator import Emulator
from ifo_support import (
    ISVC,
    FakeWorker,
    by_pod_name,
    eventually,
    holds_for,
    make_isvc,
    operator_config,
    running_operator,
)
from inferfleet.operator import labels
from inferfleet.operator.scraper import parse_load, pod_ip_metrics_url, scrape

NS = "default"
WORKERS = labels.selector_string("llm", labels.WORKER)
INTERVAL = 1  # autoscaling.intervalSeconds
DELAY = 3  # autoscaling.scaleDownDelaySeconds
AUTOSCALING = {
    "enabled": True,
    "targetInFlightPerReplica": 10,
    "intervalSeconds": INTERVAL,
    "scaleDownDelaySeconds": DELAY,
}


def replicas(emu: Emulator) -> int:
    return int(emu.get(ISVC, NS, "llm")["spec"]["replicas"])


def autoscaler_status(emu: Emulator) -> dict[str, Any]:
    return (emu.get(ISVC, NS, "llm").get("status") or {}).get("autoscaler") or {}


def test_parse_load_sums_labelled_gauges() -> None:
    text = (
        "# TYPE inferfleet_requests_waiting gauge\n"
        'inferfleet_requests_waiting{model_name="a"} 3\n'
        'inferfleet_requests_waiting{model_name="b"} 2\n'
        "# TYPE inferfleet_requests_running gauge\n"
        "inferfleet_requests_running 7\n"
        "# TYPE other_total counter\nother_total 99\n"
    )
    load = parse_load(text)
    assert (load.waiting, load.running, load.total) == (5, 7, 12)
    with pytest.raises(ValueError, match="inferfleet_requests_running"):
        parse_load("# TYPE inferfleet_requests_waiting gauge\ninferfleet_requests_waiting 1\n")
    # a NaN or infinite gauge (a foreign or broken exporter) is no load figure: refused, so that the
    # pod counts as unscraped instead of crashing the autoscaler's arithmetic
    for bad in ("NaN", "+Inf", "-Inf"):
        with pytest.raises(ValueError, match=f"inferfleet_requests_waiting is {float(bad)}"):
            parse_load(text.replace('{model_name="b"} 2', '{model_name="b"} ' + bad))


def test_pod_ip_metrics_url() -> None:
    assert pod_ip_metrics_url({"status": {"podIP": "10.1.2.3"}}) == "http://10.1.2.3:8000/metrics"
    assert pod_ip_metrics_url({"status": {"podIP": "fd00::1"}}) == "http://[fd00::1]:8000/metrics"
    assert pod_ip_metrics_url({"status": {}}) is None


@pytest.mark.asyncio
async def test_scrape_sums_ready_pods_and_marks_failures(
    fake_workers: Callable[[int], Awaitable[list[FakeWorker]]],
) -> None:
    a, b, c = await fake_workers(3)
    a.set_load(4, 2)
    b.set_load(1, 8)
    c.fail = True
    pods = [{"metadata": {"name": n}} for n in ("a", "b", "c", "no-ip")]
    urls = {"a": a.url, "b": b.url, "c": c.url}
    async with aiohttp.ClientSession() as session:
        sample = await scrape(session, pods, by_pod_name(urls))
    assert sample.load == 15 and not sample.complete
    assert set(sample.errors) == {"c", "no-ip"}
    async with aiohttp.ClientSession() as session:
        sample = await scrape(session, pods[:2], by_pod_name(urls))
    assert sample.load == 15 and sample.complete


async def delayed_scale_down(emulator: Emulator, since: float, before: int, after: int) -> None:
    """The autoscaler reports a scale-down delay, holds `before` replicas until the delay counted
    from `since` is nearly over, then goes to `after`."""
    await eventually(lambda: autoscaler_status(emulator).get("reason") == "ScaleDownDelayed", what="delay")
    await holds_for(
        lambda: replicas(emulator) == before,
        DELAY - 0.5 - (time.monotonic() - since),
        what="no early scale-down",
    )
    await eventually(
        lambda: replicas(emulator) == after, timeout=DELAY + 2 * INTERVAL + 2.0, what="scale down"
    )


@pytest.mark.asyncio
async def test_load_drives_replicas_through_the_scale_subresource(
    emulator: Emulator, fake_workers: Callable[[int], Awaitable[list[FakeWorker]]]
) -> None:
    (worker,) = await fake_workers(1)
    urls: dict[str, str] = {}
    isvc = make_isvc(
        replicas=1,
        minReplicas=1,
        maxReplicas=4,
        autoscaling=AUTOSCALING,
    )
    async with running_operator(operator_config(emulator, metrics_url=by_pod_name(urls))):
        emulator.put(ISVC, isvc)
        (pod,) = await eventually(lambda: emulator.pods_of(NS, WORKERS), what="a worker pod")
        urls[pod["metadata"]["name"]] = worker.url
        emulator.set_pod_ready(NS, pod["metadata"]["name"])
        await eventually(lambda: autoscaler_status(emulator).get("load") == 0, what="a first scrape")

        # Rising load: up at once, within one interval (plus scheduling slack).
        worker.set_load(waiting=22, running=5)  # 27 in flight / 10 per replica -> 3
        t0 = time.monotonic()
        await eventually(lambda: replicas(emulator) == 3, timeout=INTERVAL + 2.0, what="scale up to 3")
        assert time.monotonic() - t0 <= INTERVAL + 1.5
        # The scale write reached the worker Deployment (replicas + warmPool 0).
        await eventually(lambda: emulator.get("apps/v1/deployments", NS, "llm")["spec"]["replicas"] == 3)
        st = autoscaler_status(emulator)
        assert st["reason"] == "ScaleUp" and st["desired"] == 3 and st["load"] == 27

        # Max holds.
        worker.set_load(waiting=500)
        await eventually(lambda: replicas(emulator) == 4, timeout=INTERVAL + 2.0, what="scale up to max")
        await eventually(lambda: autoscaler_status(emulator).get("load") == 500, what="load 500 seen")
        assert replicas(emulator) == 4

        # Falling load: nothing for the delay, then down to min (which holds at zero load).
        worker.set_load(waiting=0)
        t_drop = time.monotonic()
        await delayed_scale_down(emulator, t_drop, 4, 1)
        assert time.monotonic() - t_drop >= DELAY
        await eventually(lambda: autoscaler_status(emulator).get("reason") == "Steady", what="steady at min")
        assert replicas(emulator) == 1

    reasons = [e.get("reason") for e in emulator.list("v1/events", NS)]
    assert reasons.count("ScaledUp") == 2 and reasons.count("ScaledDown") == 1


@pytest.mark.asyncio
async def test_with_autoscaling_disabled_the_scale_writer_is_obeyed(
    emulator: Emulator, fake_workers: Callable[[int], Awaitable[list[FakeWorker]]]
) -> None:
    (worker,) = await fake_workers(1)
    worker.set_load(waiting=1000)
    urls: dict[str, str] = {}
    async with running_operator(operator_config(emulator, metrics_url=by_pod_name(urls))):
        emulator.put(ISVC, make_isvc(replicas=2, maxReplicas=6))
        pods = await eventually(
            lambda: len(emulator.pods_of(NS, WORKERS)) == 2 and emulator.pods_of(NS, WORKERS)
        )
        for pod in pods:
            urls[pod["metadata"]["name"]] = worker.url
            emulator.set_pod_ready(NS, pod["metadata"]["name"])
        # `kubectl scale ifsvc/llm --replicas=5` (or HPA/KEDA) goes through the scale subresource.
        path = f"/apis/inferfleet.io/v1alpha1/namespaces/{NS}/inferenceservices/llm/scale"
        async with aiohttp.ClientSession() as s:
            got = await s.get(str(emulator.url).rstrip("/") + path)
            scale = await got.json()
            assert scale["spec"]["replicas"] == 2 and scale["status"]["selector"] == WORKERS
            resp = await s.patch(
                str(emulator.url).rstrip("/") + path,
                json={"spec": {"replicas": 5}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert resp.status == 200
        await eventually(lambda: emulator.get("apps/v1/deployments", NS, "llm")["spec"]["replicas"] == 5)
        await eventually(lambda: len(emulator.pods_of(NS, WORKERS)) == 5, what="5 pods")
        await eventually(lambda: (emulator.get(ISVC, NS, "llm").get("status") or {}).get("replicas") == 5)
        assert replicas(emulator) == 5  # the load (1000) never moved it: nobody scrapes
        assert autoscaler_status(emulator) == {}


@pytest.mark.asyncio
async def test_switching_autoscaling_off_and_on_starts_a_new_scale_down_delay(
    emulator: Emulator, fake_workers: Callable[[int], Awaitable[list[FakeWorker]]]
) -> None:
    """Demand is not watched while autoscaling is off: a scale-down delay that began before must
    not count that time, or switching it back on would scale down at once."""
    (worker,) = await fake_workers(1)
    worker.set_load(waiting=0)
    urls: dict[str, str] = {}
    async with running_operator(operator_config(emulator, metrics_url=by_pod_name(urls))):
        emulator.put(ISVC, make_isvc(replicas=2, minReplicas=1, maxReplicas=4, autoscaling=AUTOSCALING))
        pods = await eventually(
            lambda: len(emulator.pods_of(NS, WORKERS)) == 2 and emulator.pods_of(NS, WORKERS)
        )
        for pod in pods:
            urls[pod["metadata"]["name"]] = worker.url
            emulator.set_pod_ready(NS, pod["metadata"]["name"])
        await eventually(lambda: autoscaler_status(emulator).get("lowerSince"), what="a scale-down delay")
        emulator.patch(ISVC, NS, "llm", {"spec": {"autoscaling": {"enabled": False}}})
        await eventually(
            lambda: autoscaler_status(emulator).get("lowerSince") is None, what="the delay ended"
        )
        await asyncio.sleep(DELAY + INTERVAL)  # longer than the delay, unwatched
        emulator.patch(ISVC, NS, "llm", {"spec": {"autoscaling": {"enabled": True}}})
        t_on = time.monotonic()
        await delayed_scale_down(emulator, t_on, 2, 1)  # a new delay from t_on, not the old one
