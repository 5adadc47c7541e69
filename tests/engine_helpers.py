"""Helpers shared by the engine tests on CPU and CUDA (imported by this unique name: tests/ is on
sys.path through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from inferfleet.worker import EngineConfig, LLMEngine, SamplingParams


def greedy_rows(
    eng: Any, prompts: list[list[int]], max_tokens: int
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Generate greedily (EOS ignored) for every prompt at once through the engine `eng`: each
    request's tokens, and each request's logits rows of every step (float32, on the CPU: the
    prefill's row, then one per decode step), in prompt order."""
    ids = [str(i) for i in range(len(prompts))]
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in ids}

    def grab(request_ids: list[str], logits: torch.Tensor) -> None:
        for rid, row in zip(request_ids, logits):
            rows[rid].append(row.float().cpu().clone())

    eng.on_logits = grab
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for rid, p in zip(ids, prompts):
            eng.add_request(rid, params=params, prompt_token_ids=p)
        final = eng.generate_all(ids)
    finally:
        eng.on_logits = None
    return [final[rid].token_ids for rid in ids], [rows[rid] for rid in ids]


def greedy_run(
    model: Any, prompts: list[list[int]], max_tokens: int, *, warmup: bool = False, **config: Any
) -> tuple[list[list[int]], list[list[torch.Tensor]], LLMEngine]:
    """A fresh engine on `model` (EngineConfig fields in `config`; warmed up first if asked) runs
    greedy_rows; every KV block must be free again afterwards. Returns tokens, rows, the engine."""
    eng = LLMEngine(EngineConfig(model=str(model), **config))
    if warmup:
        eng.warmup()
    tokens, rows = greedy_rows(eng, prompts, max_tokens)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return tokens, rows, eng


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b (Frobenius norm, in float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def kv_rescaled(model: Any, k_factor: float, v_factor: float) -> Any:
    """A copy of `model` computing the same function with K `k_factor` and V `v_factor` times larger:
    the QKV projection's q rows divided by k_factor and its K rows multiplied, its V rows multiplied
    by v_factor and o_proj divided (exact in any float dtype for powers of two). Models with a q/k
    norm or a QKV bias would not compute the same function: refused. The copy's fp8 KV cache scales
    (k_scale, v_scale) stay at 1.0."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in out.model.layers:
            attn = layer.self_attn
            assert attn.q_norm is None and attn.qkv_proj.bias is None, "q/k norm or QKV bias: not rescalable"
            q, kv = attn.q_size, attn.kv_size
            attn.qkv_proj.weight[:q] /= k_factor
            attn.qkv_proj.weight[q : q + kv] *= k_factor
            attn.qkv_proj.weight[q + kv :] *= v_factor
            attn.o_proj.weight /= v_factor
    return out


def set_kv_scales(model: Any, k_scale: float, v_scale: float) -> None:
    """Every attention layer's fp8 KV cache scales."""
    for layer in model.model.layers:
        layer.self_attn.k_scale, layer.self_attn.v_scale = k_scale, v_scale


def kv_rescaled_tensors(
    tensors: dict[str, torch.Tensor], k_factor: float, v_factor: float
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (transformers' q/k/v/o_proj names) rescaled as kv_rescaled rescales a
    model: q_proj / k_factor, k_proj * k_factor, v_proj * v_factor, o_proj / v_factor."""
    factors = {"q_proj": 1 / k_factor, "k_proj": k_factor, "v_proj": v_factor, "o_proj": 1 / v_factor}
    out = dict(tensors)
    for name, t in tensors.items():
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if proj in factors:
            out[name] = t * factors[proj]
    return out


def kv_scale_tensors(num_layers: int, k_scale: float, v_scale: float) -> dict[str, torch.Tensor]:
    """Every layer's KV cache scales as a compressed-tensors checkpoint stores them."""
    out = {}
    for i in range(num_layers):
        out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([k_scale])
        out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v_scale])
    return out
