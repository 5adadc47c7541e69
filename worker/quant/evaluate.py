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
from pathlib import Path
from typing import Any

import torch

from ..layers.attention import AttentionMetadata, alloc_kv_cache, table_width
from .methods import FUSED_MAX_M

# method -> (max relative logits error, min top-1 agreement) per architecture, on the tiny models'
# held-out prompts against the unquantized model of the same dtype (docs/quantization.md justifies
# them). tests/worker/test_quant_error.py asserts them on CPU in float32 and in bfloat16,
# tests/gpu/test_quant_cuda.py on CUDA against the bf16 engine.
ERROR_BOUNDS = {
    "int8": (0.03, 0.93),
    "fp8 (as served)": (0.12, 0.80),
    "fp8 (W8A8 always)": (0.12, 0.80),
    "gptq 4-bit g32": (0.30, 0.55),
    "gptq 4-bit g32 act-order": (0.30, 0.55),
    "rtn 4-bit g32": (0.35, 0.50),
}


@torch.inference_mode()
def prompt_logits(
    model: Any,
    prompts: list[list[int]],
    last: int | None = None,
    block_size: int = 16,
    kv_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Logits [T, V] (float32, on the CPU) of each prompt's positions (the `last` ones if given).

    `kv_dtype`: the scratch KV cache's element type (default: the model dtype; an engine's
    `runner.kv_dtype` to measure with its kv_cache_dtype)."""
    cfg = model.config
    emb = model.model.embed_tokens.weight
    dev, dtype = emb.device, kv_dtype or emb.dtype
    out: list[torch.Tensor] = []
    for p in prompts:
        t = len(p)
        nb = math.ceil(t / block_size)
        kv = [
            alloc_kv_cache(nb, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, dev)
            for _ in range(cfg.num_layers)
        ]
        table = list(range(nb)) + [0] * (table_width(nb) - nb)  # rows padded as the runner pads them
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t, device=dev),
            query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
            block_tables=torch.tensor([table], dtype=torch.int32, device=dev),
            max_query_len=t,
            query_lens_host=[t],
            seq_lens_host=[t],
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
    model_dir: str | Path,
    quant: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_position: int | None = None,
) -> Any:
    """A loaded DecoderModel with the torch attention backend, bypassing EngineConfig's device checks:
    the CPU reference of FP8 (which no CPU worker may serve) runs through this. Its rotary table
    covers `max_position` positions (default: the model's, at most 4096)."""
    from dataclasses import replace

    from ..config import ModelConfig
    from ..layers.attention import TorchAttentionBackend
    from ..loader import load_model_weights
    from ..models import DecoderModel

    mc = replace(ModelConfig.from_pretrained(model_dir), quant=quant)
    if max_position is None:
        max_position = min(mc.max_position_embeddings, 4096)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderModel(mc, TorchAttentionBackend(), max_position=max_position)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    load_model_weights(model, model_dir, dtype)
    return model


class _KernelNumerics:
    """Wraps a loaded layer's INT8 / GPTQ method: batches of <= max_m rows computed as the CUDA
    kernels compute them (the method's `kernel_reference`, see `use_kernel_numerics`), larger ones
    by the method itself."""

    def __init__(self, inner: Any, max_m: int) -> None:
        self.inner, self.max_m = inner, max_m

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_m:
            return self.inner.apply(layer, x)
        return self.inner.kernel_reference(layer, x)


def use_kernel_numerics(model: Any, max_m: int = FUSED_MAX_M) -> Any:
    """Make a loaded (CPU reference) model's INT8 and GPTQ projections round where the CUDA kernels
    round, for batches of <= max_m rows: the float32 product of the activations and the exact
    dequantized weights, plus bias, rounded once to the activation dtype (each method's
    `kernel_reference`: kernels/gemv.py, kernels/gptq_gemm.py's per-block-scale path). The torch
    path rounds x . q (INT8) or the dequantized W (GPTQ) to the model dtype first: in bfloat16 that
    alone moves the tiny models' logits by ~1e-2 (docs/quantization.md), as much as the kernels' own
    rounding differences. Batches above max_m keep the torch path, which is what CUDA runs there
    (widen / dequantize, then cuBLAS). FP8's reference (quant/fp8.py) already computes in float32
    and rounds once, and has no `kernel_reference`. Returns the model, changed in place."""
    for mod in model.modules():
        method = getattr(mod, "method", None)
        if hasattr(method, "kernel_reference") and not isinstance(method, _KernelNumerics):
            mod.method = _KernelNumerics(method, max_m)
    return model
