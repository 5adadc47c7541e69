"""What the operator assumes about the worker image (see ../shared/DESIGN.md, "Contracts").

The operator image never installs torch, so these names are restated here rather than imported
from inferfleet.worker; change them together with the worker.
"""

from __future__ import annotations

WORKER_BINARY = "inferfleet-worker"
WORKER_PYTHON = "python3"  # the worker image is a Python image: used for no-op and download steps
PORT = 8000
# Seconds a deleted worker pod keeps serving before its SIGTERM (preStop sleep): Services and
# ingress learn of the deletion asynchronously, and requests they still send meanwhile would meet
# a draining worker's 503s
ENDPOINT_GRACE_SECONDS = 5
PORT_NAME = "http"
HEALTH_LIVE = "/health/live"
HEALTH_READY = "/health/ready"
METRICS_PATH = "/metrics"
API_KEY_ENV = "INFERFLEET_API_KEY"
HF_TOKEN_ENV = "HF_TOKEN"

# Gauges summed over ready pods: load = waiting + running.
METRIC_WAITING = "inferfleet_requests_waiting"
METRIC_RUNNING = "inferfleet_requests_running"
METRIC_KV_USAGE = "inferfleet_kv_cache_usage_ratio"
METRIC_READY = "inferfleet_ready"

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
BALLOON_PRIORITY_CLASS = "inferfleet-balloon"
GPU_RESOURCE = "nvidia.com/gpu"

# The worker needs a writable HOME and cache for tokenizers/compile caches; the root
# filesystem is read-only, so they live on an emptyDir.
TMP_DIR = "/tmp"
MODEL_ROOT = "/models"
