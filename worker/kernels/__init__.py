"""Triton kernels for the CUDA path. Importing this package never fails: `AVAILABLE` says whether
Triton is there (CPU workers run without it)."""

from __future__ import annotations

import functools

import numpy as np
import torch

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - CPU-only installs
    AVAILABLE = False

# the most rows the decode-batch GEMM kernels (gemv.py, gptq_gemm.gptq_gemm) take: above it the
# 8-bit and GPTQ layers widen or dequantize their weights for cuBLAS (or FP8's _scaled_mm)
MAX_M = 256

# compile options of every launch in this package: FMA contraction on, as every kernel here was
# measured and tested with. It was Triton's default through 3.9; 3.9 warns that 3.10 turns it off,
# and the one-row GEMVs would then pay a multiply and an add per weight instead of one FMA.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def triton_ok(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take activations `x`: on a CUDA device, Triton installed, 16-bit."""
    return x.is_cuda and AVAILABLE and x.dtype in (torch.bfloat16, torch.float16)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The CUDA device's multiprocessor count (what launches size their grids by)."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def to_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array or tensor on `device` without making the host wait: from pageable memory a
    CUDA copy may first wait for everything queued on the stream (CUDA's API synchronization
    behaviour), which is the step the engine is running, so CUDA copies go through pinned memory.
    Seen on the H100 under the profiler (a slower host): with the sampled rows' index copied from
    pageable memory after each mixed step's replay, W1 had 296 idle gaps of 100 us or more (325
    ms), through pinned memory 195 (102 ms); unprofiled W1 moved within noise (docs/benchmarks.md,
    nineteenth session). Off CUDA: the tensor itself (an array's memory shared)."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def sm89(device: torch.device) -> bool:
    """Whether `device` is a GPU of compute capability 8.9 or above (Ada, Hopper): what PTX's e4m3
    conversions (cvt ... e4m3x2) need."""
    return device.type == "cuda" and _capability(device.index or 0) >= (8, 9)


def sm90(device: torch.device) -> bool:
    """Whether `device` is a GPU of compute capability 9.0 or above (Hopper): what programmatic
    dependent launch needs (pdl.py), and where the larger tensor-core launches (gemv.tc_launch,
    gptq_gemm above BIG_M) were measured and their shared memory fits (up to ~160 KB; Ada's GPUs have
    ~99 KB per block)."""
    return device.type == "cuda" and _capability(device.index or 0)[0] >= 9
