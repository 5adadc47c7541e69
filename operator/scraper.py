"""Scrape worker /metrics and sum the load the autoscaler acts on.

Pod addresses come from a `MetricsUrl` function (pod -> URL or None) so tests can point the
scraper at loopback servers; production uses `pod_ip_metrics_url`. A pod that fails to answer
makes the sample incomplete rather than zero: the policy must not scale down on missing data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from inferfleet.operator import contract
from prometheus_client.parser import text_string_to_metric_families

MetricsUrl = Callable[[Mapping[str, Any]], str | None]


def pod_ip_metrics_url(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{contract.PORT}{contract.METRICS_PATH}"


@dataclasses.dataclass(frozen=True)
class PodLoad:
    waiting: float
    running: float

    @property
    def total(self) -> float:
        return self.waiting + self.running


@dataclasses.dataclass(frozen=True)
class LoadSample:
    load: float | None  # None: no pod answered
    complete: bool  # every pod asked answered
    pods: Mapping[str, PodLoad]
    errors: Mapping[str, str]


def parse_load(text: str) -> PodLoad:
    """Sum the waiting and running gauges (over any labels) in Prometheus text; a sample that is not
    a finite number is refused (ValueError), like missing gauges."""
    sums = {contract.METRIC_WAITING: 0.0, contract.METRIC_RUNNING: 0.0}
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                value = float(sample.value)
                if not math.isfinite(value):  # NaN/Inf: no load figure; the pod counts as unanswered
                    raise ValueError(f"{sample.name} is {value}")
                sums[sample.name] += value
                seen.add(sample.name)
    missing = set(sums) - seen
    if missing:
        raise ValueError(f"metrics lack {', '.join(sorted(missing))}")
    return PodLoad(sums[contract.METRIC_WAITING], sums[contract.METRIC_RUNNING])


async def _scrape_one(session: aiohttp.ClientSession, url: str) -> PodLoad:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return parse_load(await resp.text())


async def scrape(
    session: aiohttp.ClientSession,
    pods: Sequence[Mapping[str, Any]],
    metrics_url: MetricsUrl,
) -> LoadSample:
    """Scrape `pods` (already filtered to ready ones) concurrently."""
    targets: dict[str, str] = {}
    errors: dict[str, str] = {}
    for pod in pods:
        name = str(pod["metadata"]["name"])
        url = metrics_url(pod)
        if url is None:
            errors[name] = "no address"
        else:
            targets[name] = url
    results = await asyncio.gather(
        *(_scrape_one(session, url) for url in targets.values()), return_exceptions=True
    )
    loads: dict[str, PodLoad] = {}
    for name, result in zip(targets, results):
        if isinstance(result, PodLoad):
            loads[name] = result
        elif isinstance(result, Exception):
            errors[name] = f"{type(result).__name__}: {result}"
        else:
            raise result  # CancelledError and friends must propagate
    load = sum(p.total for p in loads.values()) if loads else None
    return LoadSample(load=load, complete=not errors, pods=loads, errors=errors)
