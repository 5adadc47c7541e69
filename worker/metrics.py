"""Prometheus metrics of one worker server (names are a contract: DESIGN.md, the autoscaler).

Each server owns a `CollectorRegistry`, so several servers in one process never collide. Engine
counters and gauges are read at scrape time from the latest `EngineSnapshot` (published by the
engine thread after every step), never from the engine itself, which is not thread-safe.
Latency histograms are observed on the event loop as tokens reach their streams.

Torch-free; prometheus_client is imported only when a `ServerMetrics` is built, so the operator
can import the names without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

REQUESTS_WAITING = "inferfleet_requests_waiting"
REQUESTS_RUNNING = "inferfleet_requests_running"
KV_CACHE_USAGE = "inferfleet_kv_cache_usage_ratio"
READY = "inferfleet_ready"
PROMPT_TOKENS = "inferfleet_prompt_tokens_total"
GENERATION_TOKENS = "inferfleet_generation_tokens_total"
REQUESTS = "inferfleet_requests_total"  # {finish_reason}
PREEMPTIONS = "inferfleet_preemptions_total"
PREFIX_QUERIES = "inferfleet_prefix_cache_queries_total"
PREFIX_HITS = "inferfleet_prefix_cache_hits_total"
TTFT = "inferfleet_time_to_first_token_seconds"
ITL = "inferfleet_inter_token_latency_seconds"
E2E = "inferfleet_e2e_request_latency_seconds"
QUEUE_TIME = "inferfleet_queue_time_seconds"
STARTUP = "inferfleet_startup_seconds"  # {phase}: load_weights, warmup, total (+ engine_init)
# beyond the contract: what the admission gate holds and what it turned away
ADMISSION_QUEUED = "inferfleet_admission_queued_requests"
REJECTED = "inferfleet_requests_rejected_total"  # {reason}

CONTRACT_NAMES = (
    REQUESTS_WAITING,
    REQUESTS_RUNNING,
    KV_CACHE_USAGE,
    READY,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUESTS,
    PREEMPTIONS,
    PREFIX_QUERIES,
    PREFIX_HITS,
    TTFT,
    ITL,
    E2E,
    QUEUE_TIME,
    STARTUP,
)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's counters and gauges after one step (replaced whole, never mutated)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: Mapping[str, int] = field(default_factory=dict)
    prefix_queries: int = 0
    prefix_hits: int = 0


class _EngineCollector:
    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        ready: Callable[[], bool],
        startup: Callable[[], Mapping[str, float]],
        queued: Callable[[], int],
    ) -> None:
        self._snapshot, self._ready, self._startup, self._queued = snapshot, ready, startup, queued

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._snapshot()
        yield GaugeMetricFamily(REQUESTS_WAITING, "Requests waiting in the engine", value=s.num_waiting)
        yield GaugeMetricFamily(REQUESTS_RUNNING, "Requests in the running batch", value=s.num_running)
        yield GaugeMetricFamily(KV_CACHE_USAGE, "Fraction of KV blocks in use (0..1)", value=s.kv_cache_usage)
        yield GaugeMetricFamily(READY, "1 when loaded, warmed up and not draining", value=int(self._ready()))
        yield GaugeMetricFamily(
            ADMISSION_QUEUED, "Requests admitted that the engine has not started", value=self._queued()
        )
        for name, doc, v in (
            (PROMPT_TOKENS, "Prompt tokens processed", s.prompt_tokens),
            (GENERATION_TOKENS, "Tokens generated", s.generation_tokens),
            (PREEMPTIONS, "Sequences preempted for KV space (recomputed later)", s.preemptions),
            (PREFIX_QUERIES, "Prompt tokens looked up in the prefix cache", s.prefix_queries),
            (PREFIX_HITS, "Prompt tokens served from the prefix cache", s.prefix_hits),
        ):
            yield CounterMetricFamily(name, doc, value=v)
        fam = CounterMetricFamily(REQUESTS, "Finished engine requests", labels=["finish_reason"])
        for reason in sorted({"stop", "length", "abort", *s.finished}):
            fam.add_metric([reason], s.finished.get(reason, 0))
        yield fam
        startup = GaugeMetricFamily(STARTUP, "Seconds spent in each startup phase", labels=["phase"])
        for phase, secs in sorted(self._startup().items()):
            startup.add_metric([phase], secs)
        yield startup


class ServerMetrics:
    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        ready: Callable[[], bool],
        startup: Callable[[], Mapping[str, float]],
        queued: Callable[[], int] = lambda: 0,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(TTFT, "Request arrival to first token", buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            ITL, "Time between consecutive tokens of a request", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(E2E, "Request arrival to last token", buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(
            QUEUE_TIME, "Arrival to first scheduling in the engine", buckets=_E2E_BUCKETS, registry=r
        )
        self.rejected = Counter(
            REJECTED.removesuffix("_total"), "Requests turned away before the engine", ["reason"], registry=r
        )
        r.register(_EngineCollector(snapshot, ready, startup, queued))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
