"""Quantization error on fixed prompts: logits of every position, compared with another model's.

`prompt_logits` runs one prefill per prompt through a loaded `DecoderModel` (the engine's model, on
its device and attention backend) with a scratch KV cache of its own, so it never touches an
engine's cache or its prefix-cache hashes. `logits_error` reduces two runs to the numbers reported
in tests, the benchmark and docs/quantization.md:

    rel_err = ||L_q - L||_F / ||L||_F over all positions of all prompts (float32 logits)
    top1    = fraction of positions whose argmax (the greedy next token) is the same
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..layers.attention import AttentionMetadata


@torch.inference_mode()
def prompt_logits(
    model: Any, prompts: list[list[int]], last: int | None = None, block_size: int = 16
) -> list[torch.Tensor]:
    """Logits [T, V] (float32, on the CPU) of each prompt's positions (the `last` ones if given)."""
    cfg = model.config
    emb = model.model.embed_tokens.weight
    dev, dtype = emb.device, emb.dtype
    out: list[torch.Tensor] = []
    for p in prompts:
        t = len(p)
        nb = math.ceil(t / block_size)
        shape = (nb, block_size, cfg.num_kv_heads, cfg.head_dim)
        kv = [
            (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
            for _ in range(cfg.num_layers)
        ]
        table = list(range(nb))
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t, device=dev),
            query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
            block_tables=torch.tensor([table], dtype=torch.int32, device=dev),
            max_query_len=t,
            max_seq_len=t,
            query_lens_host=[t],
            seq_lens_host=[t],
            block_tables_host=[table],
        )
        ids = torch.tensor(p, dtype=torch.long, device=dev)
        hidden = model(ids, torch.arange(t, device=dev), kv, meta)
        rows = hidden if last is None else hidden[-last:]
        out.append(model.compute_logits(rows).float().cpu())
    return out


def logits_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    num = sum(float((g.double() - r.double()).pow(2).sum()) for r, g in zip(ref, got))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    n = sum(r.shape[0] for r in ref)
    return {"rel_err": math.sqrt(num / den), "top1": agree / n, "positions": float(n)}


def build_model(
    model_dir: str, quant: Any = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """A loaded DecoderModel with the torch attention backend, bypassing EngineConfig's device checks:
    the CPU reference of FP8 (which no CPU worker may serve) runs through this."""
    from dataclasses import replace

    from ..config import ModelConfig
    from ..layers.attention import TorchAttentionBackend
    from ..loader import load_model_weights
    from ..models import DecoderModel

    mc = replace(ModelConfig.from_pretrained(model_dir), quant=quant)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderModel(
                mc, TorchAttentionBackend(), max_position=min(mc.max_position_embeddings, 4096)
            )
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    load_model_weights(model, model_dir, dtype)
    return model
