"""What the startup GEMM tuning (kernels/blaslt.py) is asked to tune, and that it stays out of CPU
workers. Its cuBLASLt calls, plans in CUDA graphs and an engine running them: tests/gpu/test_cuda.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from inferfleet.worker.cuda_graphs import MIXED_SIZES, batch_size_ladder, projection_rows
from inferfleet.worker.kernels import blaslt
from inferfleet.worker.layers.linear import SKINNY_MAX_M, Linear


def test_rows_are_the_graph_sizes_above_the_one_row_kernels() -> None:
    rows, head = projection_rows(256, 8192, SKINNY_MAX_M)
    ladder = batch_size_ladder(256)
    assert head == [b for b in ladder if b > SKINNY_MAX_M] and head[0] == 24 and head[-1] == 256
    assert rows == sorted(set(head) | {t for t in MIXED_SIZES if t > SKINNY_MAX_M})
    assert rows[-1] == 1024 and 16 not in rows and 448 in rows and 448 not in head
    # mixed graphs off, or a token budget below the largest size, or few sequences
    assert projection_rows(256, None, SKINNY_MAX_M) == (head, head)
    assert projection_rows(256, 300, SKINNY_MAX_M)[0][-1] == 256
    assert projection_rows(40, 100, SKINNY_MAX_M) == ([24, 32, 40, 64], [24, 32, 40])
    assert projection_rows(8, None, SKINNY_MAX_M) == ([], [])


def test_cpu_models_are_not_tuned() -> None:
    model = nn.Sequential(Linear(64, [32, 32]), Linear(64, [64]))
    for mod in model:
        mod.weight.data.normal_()
    assert blaslt.tunable_groups(model, [32], [32]) == []
    assert blaslt.tune(model, [32], [32], torch.device("cpu")) is None
    assert blaslt.get(torch.device("cpu")) is None
    x = torch.randn(32, 64)
    assert torch.equal(model[0](x), torch.nn.functional.linear(x, model[0].weight))


def test_mixed_graph_tokens_bound_both_the_graphs_and_the_tuning(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runner._mixed_graph_tokens: the step budget (no quantized layer to widen here), or None with
    mixed graphs turned off; it sizes MixedGraphs and the rows GEMM tuning covers alike."""
    from inferfleet.worker import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_num_batched_tokens=300))
    assert eng.runner._mixed_graph_tokens() == 300
    assert projection_rows(256, 300, SKINNY_MAX_M)[0][-1] == 256
    monkeypatch.setenv("INFERFLEET_MIXED_GRAPHS", "0")
    assert eng.runner._mixed_graph_tokens() is None
