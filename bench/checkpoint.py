"""A Llama-3.1-8B-shaped random bf16 checkpoint, drawn on the GPU and written in a few seconds.

Throughput does not depend on weight values, so the GPU numbers use this instead of downloading
the real model (nothing can be fetched on the benchmark machine anyway).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128009],
}


def make_llama8b_checkpoint(
    out_dir: str | Path, seed: int = 0, shards: int = 4, device: str = "cuda"
) -> dict[str, float]:
    """Write config, 4 safetensors shards and a (small, local) tokenizer. Returns timings."""
    import torch
    from inferfleet.worker.tiny import build_tokenizer, random_weights, save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tensors = random_weights(LLAMA_31_8B, seed, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    save_safetensors(tensors, out, shards)
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    del tensors
    # the token ids are random in every workload; this tokenizer only turns them into some text
    tok, tok_cfg = build_tokenizer("llama", 512)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=2))
    gen = {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    t2 = time.perf_counter()
    return {"draw_s": t1 - t0, "write_s": t2 - t1, "bytes": float(nbytes)}


def ensure_llama8b_checkpoint(out_dir: str | Path) -> dict[str, float] | None:
    """make_llama8b_checkpoint(out_dir) unless it has a config.json already. Returns the timings
    of the checkpoint it made, or None when it made none."""
    if (Path(out_dir) / "config.json").exists():
        return None
    return make_llama8b_checkpoint(out_dir)
