"""CUDA path checks (`pytest -m cuda`, run on the lent H100; skipped on CPU CI).

- Triton kernels + CUDA graphs against the torch reference backend on tiny float32 checkpoints:
  greedy tokens identical, for every architecture, through prefill chunks, decode graphs
  (padded batch sizes) and split-KV decode.
- bf16 on the GPU against the float32 CPU reference: logits within bf16 tolerance.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from inferfleet.worker import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

ARCHES = ("llama", "qwen2", "qwen3", "mistral")


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    out = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 7, 16, 33, 150, 300, 5, 2, 64)]
    return out + [shared + [1, 2, 3], shared + [4]]


def run(
    model: Path, ps: list[list[int]], max_tokens: int = 40, **kw: object
) -> tuple[list[list[int]], list[torch.Tensor], LLMEngine]:
    eng = LLMEngine(EngineConfig(model=str(model), **kw))  # type: ignore[arg-type]
    eng.warmup()
    first: dict[str, torch.Tensor] = {}

    def grab(ids: list[str], logits: torch.Tensor) -> None:
        for rid, row in zip(ids, logits):
            first.setdefault(rid, row.float().cpu().clone())

    eng.on_logits = grab
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(str(i), params=params, prompt_token_ids=p)
    final = eng.generate_all([str(i) for i in range(len(ps))])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return [final[str(i)].token_ids for i in range(len(ps))], [first[str(i)] for i in range(len(ps))], eng


@pytest.mark.parametrize("arch", ARCHES)
def test_triton_and_graphs_equal_reference_float32(arch: str, tiny_models: dict[str, Path]) -> None:
    ps = prompts(1)
    ref, _, _ = run(tiny_models[arch], ps, device="cpu", dtype="float32")
    got, _, eng = run(tiny_models[arch], ps, device="cuda", dtype="float32", max_num_batched_tokens=64)
    assert eng.runner.graphs is not None and eng.runner.graphs.graphs
    assert got == ref
    eager, _, _ = run(tiny_models[arch], ps, device="cuda", dtype="float32", enforce_eager=True)
    assert eager == ref


def test_decode_batches_of_every_padding(tiny_llama: Path) -> None:
    """Batches of 1..40 decodes land on padded graph sizes; each must match the reference."""
    rng = random.Random(5)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(40)]
    ref, _, _ = run(tiny_llama, ps, max_tokens=12, device="cpu", dtype="float32")
    for n in (1, 3, 9, 17, 40):
        got, _, _ = run(tiny_llama, ps[:n], max_tokens=12, device="cuda", dtype="float32", max_num_seqs=40)
        assert got == ref[:n]


@pytest.mark.parametrize("arch", ARCHES)
def test_bf16_logits_close_to_float32_reference(arch: str, tiny_models: dict[str, Path]) -> None:
    ps = prompts(2)
    _, ref, _ = run(tiny_models[arch], ps, max_tokens=2, device="cpu", dtype="float32")
    _, got, _ = run(tiny_models[arch], ps, max_tokens=2, device="cuda", dtype="bfloat16")
    for a, b in zip(got, ref):
        assert float((a - b).norm() / b.norm()) < 2e-2
