"""Triton kernels for the CUDA path. Importing this package never fails: `AVAILABLE` says whether
Triton is there (CPU workers run without it)."""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - CPU-only installs
    AVAILABLE = False

# the most rows the decode-batch GEMM kernels (gemv.py, gptq_gemm.gptq_gemm) take: above it the
# 8-bit and GPTQ layers widen or dequantize their weights for cuBLAS (or FP8's _scaled_mm)
MAX_M = 256


def triton_ok(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take activations `x`: on a CUDA device, Triton installed, 16-bit."""
    return x.is_cuda and AVAILABLE and x.dtype in (torch.bfloat16, torch.float16)
