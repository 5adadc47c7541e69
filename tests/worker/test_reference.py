"""Engine output against Hugging Face transformers on tiny random checkpoints (float32, CPU).

Greedy tokens must be identical and the logits of every generated position close, for a batch of
prompts of mixed lengths: below one block, not multiples of the block size, longer than the
prefill chunk, and two prompts that share a long prefix.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from engine_helpers import greedy_rows
from inferfleet.worker import EngineConfig, LLMEngine, SamplingParams

ARCHES = ("llama", "qwen2", "qwen3", "mistral")
NEW_TOKENS = 32
CHUNK = 48  # max_num_batched_tokens for the engine: the 150-token prompt needs several steps


def make_prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(70)]
    lengths = [1, 5, 16, 17, 31, 150]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(9)])
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(3)])
    return prompts


@pytest.fixture(scope="module")
def hf_reference(tiny_models: dict[str, Path]) -> dict[str, list[tuple[list[int], torch.Tensor]]]:
    """(greedy tokens, per-step logits [NEW_TOKENS, V]) per prompt per architecture."""
    from transformers import AutoModelForCausalLM

    refs: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for arch in ARCHES:
        model = AutoModelForCausalLM.from_pretrained(
            str(tiny_models[arch]), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        vocab = model.config.vocab_size
        out = []
        for p in make_prompts(vocab):
            ids = torch.tensor([p])
            with torch.no_grad():
                g = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    return_dict_in_generate=True,
                    output_logits=True,
                    pad_token_id=0,
                )
            tokens = g.sequences[0, len(p) :].tolist()
            logits = torch.cat(g.logits, dim=0).float()  # [NEW_TOKENS, V]
            out.append((tokens, logits))
        refs[arch] = out
    return refs


def run_engine(
    model_dir: Path, prompts: list[list[int]], **cfg: object
) -> tuple[list[list[int]], list[list[torch.Tensor]], LLMEngine]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **cfg))  # type: ignore[arg-type]
    tokens, logits = greedy_rows(engine, prompts, NEW_TOKENS)
    return tokens, logits, engine


@pytest.mark.parametrize("arch", ARCHES)
def test_greedy_tokens_and_logits_match_transformers(
    arch: str, tiny_models: dict[str, Path], hf_reference
) -> None:
    vocab = 512
    prompts = make_prompts(vocab)
    tokens, logits, engine = run_engine(
        tiny_models[arch], prompts, max_num_batched_tokens=CHUNK, max_num_seqs=8
    )
    for i, (ref_tokens, ref_logits) in enumerate(hf_reference[arch]):
        assert tokens[i] == ref_tokens, f"{arch} prompt {i} (len {len(prompts[i])}) diverged"
        ours = torch.stack(logits[i])
        assert ours.shape == ref_logits.shape
        rel = (ours - ref_logits).norm() / ref_logits.norm()
        assert rel < 1e-4, f"{arch} prompt {i}: relative logits error {rel:.2e}"
        # the first generated position on its own (the prompt's last position)
        rel0 = (ours[0] - ref_logits[0]).norm() / ref_logits[0].norm()
        assert rel0 < 1e-4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # again, now that the shared prefix sits in the cache: 4 full blocks reused, same tokens
    hits = engine.block_manager.prefix_hits
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("100", params=params, prompt_token_ids=prompts[7])
    again = engine.generate_all(["100"])["100"]
    assert again.num_cached_tokens == 64
    assert engine.block_manager.prefix_hits - hits == 64
    assert again.token_ids == hf_reference[arch][7][0]


@pytest.mark.parametrize(
    ("arch", "rope", "engine_cfg"),
    [
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, {}),
        # without original_max_position_embeddings YaRN starts from the checkpoint's context, not
        # from the max_model_len the engine runs with
        ("qwen2", {"rope_type": "yarn", "factor": 4.0}, {"max_model_len": 512}),
        ("llama", {"rope_type": "linear", "factor": 2.0}, {}),
        ("mistral", None, {}),
    ],
    ids=["yarn", "yarn-default-context", "linear", "no-scaling"],
)
def test_rope_variants_match_transformers(
    arch: str, rope: dict | None, engine_cfg: dict, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Rope scaling types beyond the tiny defaults, checked on positions past the original context."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path / arch
    shutil.copytree(tiny_models[arch], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    prompt = make_prompts(512, seed=11)[5] * 2  # 300 tokens
    model = AutoModelForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    _, logits, _ = run_engine(d, [prompt], max_num_batched_tokens=128, **engine_cfg)
    ours = logits[0][0]
    assert ((ours - ref).norm() / ref.norm()) < 1e-4


def test_yarn_attention_scaling_only_when_the_context_is_stretched() -> None:
    """YaRN's default attention factor is 0.1 ln(factor) + 1 for factor > 1 and 1 otherwise
    (transformers' get_mscale); a factor of 1 or below must not shrink cos/sin."""
    from inferfleet.worker.config import RopeConfig
    from inferfleet.worker.layers.rotary import inverse_frequencies

    def scale(factor: float) -> float:
        rope = RopeConfig(
            theta=10000.0, rope_type="yarn", factor=factor, original_max_position_embeddings=128
        )
        return inverse_frequencies(rope, 64)[1]

    assert scale(4.0) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert scale(1.0) == 1.0 and scale(0.5) == 1.0
