"""sampling.argmax_rows off CUDA is torch.argmax (the one-launch CUDA kernel is tested in
tests/gpu/kernel_cases.py, under Triton's interpreter here)."""

from __future__ import annotations

import pytest
import torch
from inferfleet.worker.sampling import argmax_rows


def test_argmax_rows_on_cpu_is_torch_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferfleet.worker.kernels import elementwise

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CUDA kernel must not run for CPU logits")

    monkeypatch.setattr(elementwise, "argmax_rows", refuse)
    logits = torch.randn(3, 500)
    logits[1, 7] = logits[1, 300] = 9.0
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert argmax_rows(logits)[1].item() == 7
