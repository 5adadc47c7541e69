"""Per-InferenceService runtime: status refresh, autoscaling and periodic drift checks.

One daemon per InferenceService runs `refresh` whenever something relevant happens (a worker
pod changed, the spec was applied) and at least every status interval. All writes for one
InferenceService (applying children, status, scaling) happen under its lock, so status is
computed from a consistent view and conditions have a single writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from inferfleet.operator import autoscaler, labels
from inferfleet.operator.config import OperatorConfig
from inferfleet.operator.kube import ISVCS, PODS, ApiError, KubeClient
from inferfleet.operator.plan import (
    ChildRef,
    balloon_ref,
    build_worker_deployment,
    plan_spec,
    prepull_ref,
    worker_ref,
)
from inferfleet.operator.reconcile import read_child, read_children, restore_drifted
from inferfleet.operator.scraper import LoadSample, scrape
from inferfleet.operator.spec import ServiceSpec, SpecError
from inferfleet.operator.status import Observed, build_status, invalid_status, ready_pods


@dataclasses.dataclass
class ServiceRuntime:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    applied_generation: int | None = None
    apply_error: str | None = None  # the spec's last apply, refused (handlers.reconcile)
    resync_error: str | None = None  # the last drift check's re-apply, refused (Fleet.refresh)
    scale_state: autoscaler.State | None = None  # None: not yet read back from status
    last_autoscale: float | None = None
    last_resync: float | None = None


class Fleet:
    """The runtime of every InferenceService this operator process serves."""

    def __init__(self, kube: KubeClient, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self._services: dict[tuple[str, str], ServiceRuntime] = {}
        # child (plural, namespace, name) -> essence last found free of drift: status-only
        # events (every pod readiness change updates a Deployment's status) skip the check.
        self.checked: dict[tuple[str, str, str], str] = {}
        self._http: aiohttp.ClientSession | None = None

    def runtime(self, namespace: str, name: str) -> ServiceRuntime:
        return self._services.setdefault((namespace, name), ServiceRuntime())

    def wake(self, namespace: str, name: str) -> None:
        """Nudge a running daemon; a service without one refreshes when its daemon starts."""
        rt = self._services.get((namespace, name))
        if rt is not None:
            rt.wake.set()

    def forget(self, namespace: str, name: str) -> None:
        self._services.pop((namespace, name), None)

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.scrape_timeout_s)
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.kube.close()

    async def run(
        self, namespace: str, name: str, stopped: kopf.DaemonStopped, logger: logging.Logger
    ) -> None:
        """The daemon body: refresh, then wait for a wake-up, the next due time, or stop."""
        rt = self.runtime(namespace, name)
        try:
            while not stopped:
                rt.wake.clear()
                delay = self.config.status_interval_s
                try:
                    delay = await self.refresh(namespace, name, logger)
                except (ApiError, aiohttp.ClientError, TimeoutError) as e:
                    logger.warning(f"status refresh failed, retrying: {e}")
                await _wait_any(stopped, rt.wake, delay)
        finally:
            self.forget(namespace, name)

    async def refresh(self, namespace: str, name: str, logger: logging.Logger) -> float:
        """Write status (and scale, and restore drift when due). Returns seconds to the next run."""
        rt = self.runtime(namespace, name)
        async with rt.lock:
            isvc = await self.kube.get(ISVCS, namespace, name)
            if isvc is None or isvc["metadata"].get("deletionTimestamp"):
                return self.config.status_interval_s
            now = self.config.clock()
            previous = isvc.get("status") or {}
            try:
                s = ServiceSpec.from_body(isvc)
            except SpecError as e:
                await self._write_invalid(isvc, previous, str(e), now)
                return self.config.status_interval_s
            pods = await self.kube.list(PODS, namespace, labels.selector_string(name, labels.WORKER))
            # The children status reports on: read on every refresh, and reused by the drift check.
            read: dict[ChildRef, dict[str, Any] | None] = {}
            prepull, balloon = prepull_ref(s), balloon_ref(s)
            if s.prepull_enabled:
                read[prepull] = await read_child(self.kube, namespace, prepull)
            if s.balloons:
                read[balloon] = await read_child(self.kube, namespace, balloon)
            observed = Observed(pods=pods, prepull=read.get(prepull), balloon=read.get(balloon))
            scaler_status = None
            interval = float(s.autoscaling.interval_seconds)
            if s.autoscaling.enabled and _due(rt.last_autoscale, interval, now):
                scaler_status = await self._autoscale(rt, isvc, s, pods, now, logger)
                rt.last_autoscale = now
            elif not s.autoscaling.enabled:
                # A scale-down stretch ends with the autoscaler: demand goes unwatched while it is
                # off, so switching it on again starts a new one, here and in status (which a
                # restarted operator resumes from), rather than scaling down at once.
                rt.scale_state = autoscaler.State()
                held = previous.get("autoscaler") or {}
                if held.get("lowerSince") is not None:
                    scaler_status = {**held, "lowerSince": None, "lowerPeak": None}
            worker = None  # the worker Deployment as planned: its template hash goes into status
            if rt.applied_generation is not None and _due(rt.last_resync, self.config.resync_interval_s, now):
                desired = plan_spec(s)  # the whole plan only when due: status needs the worker's hash alone
                worker = next(o for o in desired if ChildRef.of(o) == worker_ref(s))
                live = await read_children(self.kube, namespace, desired, known=read)
                try:
                    restored = await restore_drifted(self.kube, desired, live)
                except ApiError as e:  # reported in status like a refused apply; retried when due again
                    logger.warning(f"restoring drifted children failed: {e}")
                    rt.resync_error = str(e)
                else:
                    rt.resync_error = None
                    if restored:
                        logger.info(f"restored drifted children: {', '.join(r.name for r in restored)}")
                rt.last_resync = now
            status = build_status(
                s,
                previous,
                observed,
                template_hash=_template_hash(worker or build_worker_deployment(s)),
                observed_generation=rt.applied_generation,
                apply_error=rt.apply_error or rt.resync_error,
                autoscaler=scaler_status,
                now=_dt(now),
            )
            if _differs(status, previous):
                await self.kube.patch_status(ISVCS, namespace, name, status)
        if s.autoscaling.enabled:
            return max(
                0.0, min(self.config.status_interval_s, rt.last_autoscale + interval - self.config.clock())
            )
        return self.config.status_interval_s

    async def _autoscale(
        self,
        rt: ServiceRuntime,
        isvc: Mapping[str, Any],
        s: ServiceSpec,
        pods: list[dict[str, Any]],
        now: float,
        logger: logging.Logger,
    ) -> dict[str, Any]:
        prev = (isvc.get("status") or {}).get("autoscaler") or {}
        if rt.scale_state is None:  # first run in this process: resume a pending scale-down delay
            since = prev.get("lowerSince")
            rt.scale_state = autoscaler.State(
                lower_since=_parse_time(since) if since else None, lower_peak=int(prev.get("lowerPeak") or 0)
            )
        ready = ready_pods(pods)
        sample = (
            await scrape(self.http(), ready, self.config.metrics_url)
            if ready
            else LoadSample(None, False, {}, {})
        )
        policy = autoscaler.policy_for(s)
        d = autoscaler.decide(policy, sample.load, sample.complete, s.replicas, rt.scale_state, now)
        rt.scale_state = d.state
        load = "unknown" if d.load is None else f"{d.load:g}"
        message = (
            f"replicas {s.replicas} -> {d.replicas}: load {load} over {len(sample.pods)} ready pods, "
            f"target {s.autoscaling.target_in_flight_per_replica}/replica ({d.reason})"
        )
        if sample.errors:
            message += f"; unscraped: {', '.join(sorted(sample.errors))}"
        if d.changes(s.replicas):
            await self.kube.patch_scale(ISVCS, s.namespace, s.name, d.replicas)
            reason = "ScaledUp" if d.replicas > s.replicas else "ScaledDown"
            kopf.event(dict(isvc), type="Normal", reason=reason, message=message)
            logger.info(message)
        out: dict[str, Any] = {
            "load": d.load,
            "desired": d.desired,
            "replicas": d.replicas,
            "reason": d.reason,
            "message": message[:512],
            "time": _rfc3339_precise(now),
            "lowerSince": _rfc3339_precise(d.state.lower_since) if d.state.lower_since is not None else None,
            "lowerPeak": d.state.lower_peak if d.state.lower_since is not None else None,
        }
        return out

    async def _write_invalid(
        self, isvc: Mapping[str, Any], previous: Mapping[str, Any], error: str, now: float
    ) -> None:
        status = invalid_status(error, previous, _dt(now), int(isvc["metadata"].get("generation") or 1))
        if _differs(status, previous):
            meta = isvc["metadata"]
            await self.kube.patch_status(ISVCS, meta["namespace"], meta["name"], status)


def _template_hash(worker: Mapping[str, Any]) -> str:
    """The spec-hash of a planned worker Deployment's pod template."""
    return str(worker["spec"]["template"]["metadata"]["annotations"][labels.SPEC_HASH])


def _due(last: float | None, interval: float, now: float) -> bool:
    return last is None or now - last >= interval


def _differs(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _dt(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC)


def _rfc3339_precise(t: float) -> str:
    return _dt(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


async def _wait_any(stopped: kopf.DaemonStopped, wake: asyncio.Event, timeout: float) -> None:
    async def stop() -> None:
        await stopped.wait()

    tasks = [asyncio.ensure_future(stop()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
