"""Every number the fleet simulation uses, in one place, each marked measured or assumed.

Measured: one H100 80GB HBM3, 2026-11-25, Llama-3.1-8B shape in bf16, `python bench/gpu_bench.py`;
tables in docs/benchmarks.md ("Engine on one H100"), raw output in
docs/bench/2026-11-25-h100-run1.json (keys named next to each value below).
Assumed: anything else, with the reason for the value. Never present an assumed value as measured.

The step-time model of one worker (continuous batching, chunked prefill) is

    step_ms = a + b * decodes + c * prefill_tokens + d * kv_tokens_read

`d` is the KV bytes of one token (32 layers x 2 x 8 KV heads x 128 x 2 B = 128 KiB) over the
paged-attention kernel's measured 2,876 GB/s; `a`, `b`, `c` are solved exactly from three
measured points (W3's batch-1 decode step, one 2,048-token prefill, W2 128/128). Everything else
measured (W1, W2 2048/128, W2 1000/1000, HF-mix) is held out and only checked (`check_points`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

# -- measured: docs/bench/2026-11-25-h100-run1.json ---------------------------------------------
WEIGHT_BYTES = 16_060_522_496  # checkpoint.bytes: Llama-3.1-8B shape, bf16
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # from the shape (docs/benchmarks.md header)
ATTN_KV_GBPS = 2876.0  # docs/benchmarks.md "Paged-attention decode kernel: 2,876 GB/s ... 1,024 context"
MAX_NUM_SEQS = 256  # engine settings of the measured runs (docs/benchmarks.md)
MAX_BATCHED_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured run: `steps` engine steps over `seconds`, with its token totals."""

    name: str
    seconds: float
    steps: int
    decodes: int  # decode tokens computed (the first output token comes from the prefill step)
    prefill_tokens: int
    kv_reads: int  # sum over decode steps of the context each one reads
    preemptions: int = 0
    role: str = "check"  # "fit": used to solve a, b, c; "check": held out

    @classmethod
    def of_lengths(
        cls, name: str, seconds: float, steps: int, lengths: Iterable[tuple[int, int]], **kw: object
    ) -> Point:
        """A run of requests with exact (prompt, output) lengths (EOS ignored)."""
        ls = list(lengths)
        return cls(
            name,
            seconds,
            steps,
            decodes=sum(o - 1 for _, o in ls),
            prefill_tokens=sum(p for p, _ in ls),
            # a decode step of a sequence reads contexts p+1 .. p+o-1
            kv_reads=sum((o - 1) * p + (o - 1) * o // 2 for p, o in ls),
            **kw,  # type: ignore[arg-type]
        )


def measured_points(w1: list[tuple[int, int]], hf_mix: list[tuple[int, int]]) -> list[Point]:
    """The measured runs of docs/benchmarks.md; `w1` and `hf_mix` lengths come from
    bench/workloads.py (the seeds the benchmark used: 135,484 in / 140,164 out for W1)."""
    return [
        # w3.decode_ms_mean: one decode step at batch 1, 128 in / 256 out (mean context ~256)
        Point("W3 decode step, batch 1", 0.0064737, 1, 1, 0, 256, role="fit"),
        # ttft_2048.ttft_ms_median: one 2,048-token prompt in one step
        Point("prefill 2048 tokens (TTFT)", 0.0512512, 1, 0, 2048, 0, role="fit"),
        # w2_128_128: 1,000 requests 128/128, 515 steps, 0 preemptions
        Point.of_lengths("W2 128/128 x1000", 9.27466, 515, [(128, 128)] * 1000, role="fit"),
        # w1: 256 requests U[100,1024] in/out, 1,026 steps, 0 preemptions
        Point.of_lengths("W1 256 x U[100,1024]", 18.87837, 1026, w1),
        # w2_2048_128: 407 steps, 14 preemptions (their recompute is not modelled)
        Point.of_lengths("W2 2048/128 x500", 36.25624, 407, [(2048, 128)] * 500, preemptions=14),
        # w2_1000_1000: 4,357 steps, 126 preemptions
        Point.of_lengths("W2 1000/1000 x1000", 146.38652, 4357, [(1000, 1000)] * 1000, preemptions=126),
        # hfmix: 128 requests, prompt 64-1024, output 64-512, 515 steps, 126 preemptions
        Point.of_lengths("HF-mix x128", 7.25850, 515, hf_mix, preemptions=126),
    ]


@dataclasses.dataclass(frozen=True)
class StepModel:
    a_ms: float  # per step: launch, host scheduling, weight streaming
    b_ms: float  # per decoding sequence
    c_ms: float  # per prefill token
    d_ms: float  # per KV token read by decode attention

    def step_ms(self, decodes: int, prefill_tokens: int, kv_tokens: int) -> float:
        return self.a_ms + self.b_ms * decodes + self.c_ms * prefill_tokens + self.d_ms * kv_tokens

    def run_seconds(self, p: Point) -> float:
        """Predicted seconds for a measured run, given its step count and token totals."""
        ms = self.a_ms * p.steps + self.b_ms * p.decodes + self.c_ms * p.prefill_tokens
        return (ms + self.d_ms * p.kv_reads) / 1000.0


def fit_step_model(points: Iterable[Point]) -> StepModel:
    """Solve a, b, c exactly from the three "fit" points, with d fixed by the kernel bandwidth."""
    d_ms = KV_BYTES_PER_TOKEN / (ATTN_KV_GBPS * 1e9) * 1e3
    fit = [p for p in points if p.role == "fit"]
    assert len(fit) == 3, "three points for three unknowns"
    m = np.array([[p.steps, p.decodes, p.prefill_tokens] for p in fit], dtype=float)
    y = np.array([p.seconds * 1000.0 - d_ms * p.kv_reads for p in fit])
    a, b, c = np.linalg.solve(m, y)
    return StepModel(float(a), float(b), float(c), d_ms)


def check_points(model: StepModel, points: Iterable[Point]) -> list[dict[str, object]]:
    return [
        {
            "run": p.name,
            "role": p.role,
            "measured_s": p.seconds,
            "predicted_s": model.run_seconds(p),
            "error": model.run_seconds(p) / p.seconds - 1.0,
            "preemptions": p.preemptions,
        }
        for p in points
    ]


# Held-out error the model is held to (tests/bench/test_fleet_sim.py): fit points are exact by
# construction; preemption-free held-out runs within 10%; runs with preemptions (their recompute is
# not modelled, so the model reads low) within 15%.
TOLERANCE_NO_PREEMPTION = 0.10
TOLERANCE_WITH_PREEMPTION = 0.15


@dataclasses.dataclass(frozen=True)
class FleetParams:
    """Times in seconds. `[measured]` values cite docs/benchmarks.md and the run's JSON key;
    `[assumed]` values are not measured by this project."""

    # [measured] startup.load_weights: 16.06 GB from page cache to the GPU (6.8 GB/s)
    load_weights_s: float = 2.353
    # [measured] startup.construct_and_warmup_s (10.617) minus load_weights: tokenizer, model
    # construct, KV allocation (engine_init 4.430 includes load_weights) and warm-up 6.186
    # (CUDA-graph capture of 35 batch sizes, 5.28 s in docs/benchmarks.md)
    init_and_warmup_s: float = 10.617 - 2.353
    # [assumed] process start to engine construct: Python and torch imports, server start.
    # An estimate, not measured here.
    process_start_s: float = 3.0
    # [assumed] the first start on a node reads the weights from disk, not page cache; issue 7
    # quotes 1.2 GB/s seen from a cold disk (not yet in docs/benchmarks.md). Later starts on the
    # same node find the weights in page cache (load_weights_s).
    cold_disk_gbps: float = 1.2
    # [assumed] pending pod -> GPU node allocatable: GKE documents 80-120 s per node
    # (shared/research/operator_anchors.md, sections 2 and 3); includes the cluster autoscaler's scan.
    node_provision_s: float = 90.0
    # [assumed] pulling a ~10 GB CUDA worker image on a fresh node (60-120 s is typical)
    image_pull_s: float = 90.0
    # [assumed] a node turns Ready before its GPU is allocatable (driver, device plugin); the
    # pre-pull DaemonSet's pod asks for no GPU and starts pulling that much earlier
    prepull_head_start_s: float = 15.0
    # [assumed] preempting a balloon (grace 0) and binding the worker in its place
    preempt_s: float = 2.0
    # [assumed] ready pod -> in the Service's endpoints (EndpointSlice + kube-proxy sync)
    endpoint_lag_s: float = 1.0
    # [assumed] cluster autoscaler's default --scale-down-unneeded-time (10 min): a node with no
    # GPU pod is removed after this long
    node_idle_s: float = 600.0
    # [assumed] on-demand price of one H100-hour, for the cost column only (scales linearly)
    gpu_hour_usd: float = 3.0
    # [assumed] a request whose first token takes longer than this counts as a client timeout
    # (still served; reported, not dropped)
    client_timeout_s: float = 60.0
    # the worker's admission limit (worker/server.py max_queued_requests) and its 429's
    # Retry-After (worker/serving.py): configuration, not measurement
    max_queued_requests: int = 1024
    retry_after_s: float = 1.0
    # [assumed] clients use the openai library's default: retry a 429 twice, honouring Retry-After
    client_retries: int = 2
    # engine settings of the measured runs
    max_num_seqs: int = MAX_NUM_SEQS
    max_batched_tokens: int = MAX_BATCHED_TOKENS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0")
        if self.prepull_head_start_s > self.node_provision_s:
            raise ValueError("prepull_head_start_s cannot exceed node_provision_s")

    @property
    def cold_load_weights_s(self) -> float:
        return WEIGHT_BYTES / (self.cold_disk_gbps * 1e9)

    def worker_start_s(self, weights_cached: bool) -> float:
        """Container start -> engine ready (before any probe notices)."""
        load = self.load_weights_s if weights_cached else self.cold_load_weights_s
        return self.process_start_s + load + self.init_and_warmup_s


MEASURED = ("load_weights_s", "init_and_warmup_s")
CONFIGURATION = ("max_queued_requests", "retry_after_s", "max_num_seqs", "max_batched_tokens")
