"""The two-pass row argmax of sampling.py (greedy decoding of a few rows) against torch.argmax."""

from __future__ import annotations

import pytest
import torch
from inferfleet.worker.sampling import argmax_rows, argmax_two_pass


@pytest.mark.parametrize("chunks", [1, 4, 128])
def test_two_pass_argmax_matches_torch(chunks: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 128 * 8, generator=g)
    logits[1, 700] = logits[1, 3] = 9.0  # a tie across slices: the first index wins
    logits[2, 17] = logits[2, 18] = 9.0  # a tie inside one slice
    logits[3] = 1.5  # the whole row tied
    logits[4, 511] = float("nan")  # NaN counts as the largest value, as torch.argmax has it
    logits[5, -1] = float("inf")
    got = argmax_two_pass(logits, chunks)
    assert got.tolist() == logits.argmax(dim=-1).tolist()
    assert got.tolist()[:4] == [got[0].item(), 3, 17, 0]


def test_argmax_rows_on_cpu_is_torch_argmax() -> None:
    logits = torch.randn(3, 500)
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
