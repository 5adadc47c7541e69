"""Triton kernels for the CUDA path. Importing this package never fails: `AVAILABLE` says whether
Triton is there (CPU workers run without it)."""

from __future__ import annotations

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - CPU-only installs
    AVAILABLE = False
