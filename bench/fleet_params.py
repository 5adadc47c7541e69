"""Every number the fleet simulation uses, in one place, each marked measured or assumed.

Measured: one H100 80GB HBM3, 2026-11-25, Llama-3.1-8B shape in bf16; tables in
docs/benchmarks.md. Engine speed: run 2 (pipelined engine, `python bench/gpu_bench.py`), raw
docs/bench/2026-11-25-h100-run2.json. Worker start: `python bench/startup_bench.py`, raw
docs/bench/2026-11-25-h100-startup.json. The keys are named next to each value below.
Assumed: anything else, with the reason for the value. Never present an assumed value as measured.

The step-time model of one worker (continuous batching, chunked prefill) is

    step_ms = a + b * decodes + c * prefill_tokens + d * kv_tokens_read

`d` is the KV bytes of one token (32 layers x 2 x 8 KV heads x 128 x 2 B = 128 KiB) over the
paged-attention kernel's measured 2,876 GB/s; `a`, `b`, `c` are solved exactly from three
measured points (W3's batch-1 decode step, one 2,048-token prefill, W2 128/128). W1 and HF-mix
are held out and only checked (`check_points`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

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
    """Run 2 of docs/benchmarks.md (pipelined engine); `w1` and `hf_mix` lengths come from
    bench/workloads.py (the seeds the benchmark used: 135,484 in / 140,164 out for W1).
    W2 2048/128 and 1000/1000 exist only from run 1 (synchronous engine), so they are not used."""
    return [
        # w3.decode_ms_mean: one decode step at batch 1, 128 in / 256 out (mean context ~256)
        Point("W3 decode step, batch 1", 0.0061837, 1, 1, 0, 256, role="fit"),
        # ttft_2048.ttft_ms_median: one 2,048-token prompt in one step
        Point("prefill 2048 tokens (TTFT)", 0.0510031, 1, 0, 2048, 0, role="fit"),
        # w2_128_128: 1,000 requests 128/128, 519 steps, 0 preemptions
        Point.of_lengths("W2 128/128 x1000", 8.44366, 519, [(128, 128)] * 1000, role="fit"),
        # w1: 256 requests U[100,1024] in/out, 1,027 steps, 0 preemptions
        Point.of_lengths("W1 256 x U[100,1024]", 16.69835, 1027, w1),
        # hfmix: 128 requests, prompt 64-1024, output 64-512, 516 steps, 0 preemptions
        Point.of_lengths("HF-mix x128", 6.62038, 516, hf_mix),
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
# construction; held-out runs (none had preemptions) within 5% (W1 reads 2.4% fast, HF-mix 1.3%).
TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class FleetParams:
    """Times in seconds. `[measured]` values cite docs/benchmarks.md and the run's JSON key;
    `[assumed]` values are not measured by this project."""

    # [measured] startup.json ready_page_cache.process_start_to_live_s: Python and torch
    # imports, server up
    process_start_s: float = 5.168
    # [measured] startup.json phases.load_weights: 16.06 GB from page cache to the GPU (18.1 GB/s)
    load_weights_s: float = 1.011
    # [measured] startup.json: process_start_to_ready_s 9.697 less the two above: engine init,
    # KV allocation, warm-up with CUDA-graph capture (Triton's kernel cache already filled)
    init_and_warmup_s: float = 9.697 - 5.168 - 1.011
    # [assumed] a new pod has an empty Triton cache (HOME is an emptyDir), and compiling during
    # the first graph capture adds about this much (docs/benchmarks.md's estimate from capture
    # times of 4.76-5.28 s on fresh machines; not measured as a phase of its own)
    triton_compile_s: float = 3.0
    # [measured] startup.json cold_disk.loader_gbs: the first start on a node reads the weights
    # from disk (1.33 GB/s = 91% of the raw 1.46 GB/s); later starts there find them in page cache
    cold_disk_gbps: float = 1.327
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
        """Container start -> /health/ready would answer 200 (before any probe notices)."""
        load = self.load_weights_s if weights_cached else self.cold_load_weights_s
        return self.process_start_s + load + self.init_and_warmup_s + self.triton_compile_s


MEASURED = ("process_start_s", "load_weights_s", "init_and_warmup_s", "cold_disk_gbps")
CONFIGURATION = ("max_queued_requests", "retry_after_s", "max_num_seqs", "max_batched_tokens")
