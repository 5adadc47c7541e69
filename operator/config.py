"""The operator's own configuration: one object, built once (by the CLI or a test)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import kopf
from inferfleet.operator.scraper import MetricsUrl, pod_ip_metrics_url


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    # Where a worker pod's /metrics is; tests point it at loopback servers.
    metrics_url: MetricsUrl = pod_ip_metrics_url
    # Fixed credentials (tests); None logs in like kopf does (in-cluster, then kubeconfig).
    connection: kopf.ConnectionInfo | None = None
    field_manager: str = "inferfleet-operator"
    # How often each InferenceService's status is refreshed without any event, and how often
    # its children are compared with the plan (watch events catch most drift sooner).
    status_interval_s: float = 30.0
    resync_interval_s: float = 120.0
    scrape_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    # Watch streams can stall silently (kopf#585): the server ends them, the client gives up later.
    watch_server_timeout_s: float = 300.0
    watch_client_timeout_s: float = 330.0
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.watch_client_timeout_s <= self.watch_server_timeout_s:
            raise ValueError("watch_client_timeout_s must exceed watch_server_timeout_s")
        for name in ("status_interval_s", "resync_interval_s", "scrape_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
