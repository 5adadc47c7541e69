"""Programmatic dependent launch (Hopper PDL) for the decode kernels.

A batch-1 decode step is ~300 short kernels, each a pass over one weight matrix or a few KB of
activations; between two of them the card idles while the first one's last programs drain and the
next one's launch and first loads are in flight. With PDL a kernel is launched while its
predecessor still runs: its programs start, compute addresses and load what does not depend on the
predecessor (weights), then wait (`griddepcontrol.wait`) until the predecessor has finished and
its writes are visible, and only then read activations and write outputs.

Rules every kernel launched with `launch_pdl=True` follows here:
- it calls `wait` in every program before it reads anything the kernel just before it may have
  written and before it writes anything (an unconditional wait also makes the ordering transitive: a kernel that finished
  had waited for its own predecessor);
- it calls `launch_dependents` right after that wait (not before: issued at kernel start it let
  kernels further down the chain pile onto the SMs, waiting, and the chain ran slower); it lets the
  next kernel's programs be scheduled on free SM slots, where they wait for this one to finish.
  One exception: the split-KV merge (paged_attention._merge_kernel), one warp per row, lets the
  output projection launch at its start, so that the projection's programs load their first weight
  tiles while attention runs; the projection itself waits and launches its successor as above, so
  nothing further piles up (H100: W3 3.31 -> 3.24 ms in fp8, docs/benchmarks.md, ninth session);
- what it reads before the wait was written by a kernel at least two launches back, or by host
  copies before the step: a kernel starts only once its predecessor has passed its own wait (or,
  after the merge, has started: the projection reads only weights before its wait), so
  everything before the predecessor has finished (the decode attention kernel reads the step's
  inputs and the cached context this way while the QKV projection still runs, in decode batches
  of up to layers/attention.FUSED_DECODE_MAX_ROWS rows).
Kernels of torch (cuBLAS, elementwise) are launched normally and wait for full completion, so mixing
is safe. Who launches with PDL: the one-row GEMVs (gemv.py, gptq_row4.py, gptq_gemm.gptq_stream) and the small
kernels (norms, rotary + KV write, attention and its merge, SiLU) at every size; the tensor-core
GEMV path does not (measured slower with it: bench/gemv_bench.py, docs/benchmarks.md). `enabled()` is false unless the engine turns it on for a device that has it (compute
capability 9.0+); the CPU interpreter never sees the PDL instructions (they sit behind a constexpr).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import sm90

_enabled = False


def supported(device: torch.device) -> bool:
    return sm90(device)


def set_enabled(on: bool) -> None:
    """Turn PDL launches on for every kernel in worker/kernels (off with INFERFLEET_PDL=0)."""
    global _enabled
    _enabled = bool(on) and os.environ.get("INFERFLEET_PDL", "1") != "0"


def enabled() -> bool:
    return _enabled


@triton.jit
def wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
