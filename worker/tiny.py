"""`inferfleet-worker make-tiny-model`: a small random-weight checkpoint in Hugging Face layout.

Everything is built locally and deterministically from the seed: config.json, safetensors weights
(one file or several shards with an index), a byte-level BPE tokenizer trained on a built-in text,
tokenizer_config.json with a chat template, generation_config.json. Tests, the demo and e2e use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHES = ("llama", "qwen2", "qwen3", "mistral")

_CORPUS = """\
An inference fleet turns requests into tokens. Each worker keeps a paged cache of keys and values,
so that a long conversation costs memory in blocks of sixteen tokens and not in one large slab.
The scheduler admits new requests while older ones are still decoding: this is continuous batching.
Long prompts are cut into chunks, so that one large prefill never stalls the streams of everyone else.
When two prompts begin with the same system message, the blocks that hold it are shared and reused.
The operator watches the queue of every worker and adds replicas before the queue grows too long.
Balloon pods hold a GPU node so that the next replica does not wait for the cloud to provision one.
A warm pool keeps loaded replicas ready; a pre-pull daemon set puts the image on every node early.
Readiness turns green only once the weights are loaded, so no request ever waits on a cold worker.
Hello! How can I help you today? Please write a short poem about the sea, the wind and the stars.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; code: def main(): return 42; JSON: {"key": [1, 2, 3]}.
Café, naïve, façade, Ünïcödé, 東京, Москва, 🙂🚀 — text beyond ASCII must survive a round trip.
"""

_CHAT_TEMPLATES = {
    # Llama 3 style headers
    "llama": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # ChatML, as the Qwen families use
    "qwen": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Mistral instruct style
    "mistral": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unsupported role: ' ~ m['role']) }}{% endif %}"
        "{% endfor %}"
    ),
}

_SPECIALS = {
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "mistral": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
}


def _family(arch: str) -> str:
    return "qwen" if arch.startswith("qwen") else arch


def build_tokenizer(arch: str, vocab_size: int) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE tokenizer (any text encodes) and its tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    fam = _family(arch)
    specials = _SPECIALS[fam]
    tok = Tokenizer(models.BPE())
    if fam == "qwen":
        # Qwen checkpoints split words, single digits and punctuation runs before byte-level BPE;
        # transformers' Qwen2Tokenizer applies that split whatever tokenizer.json says, so match it.
        split = pre_tokenizers.Split(
            Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+"
            ),
            behavior="isolated",
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    if fam == "llama":
        bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    elif fam == "mistral":
        bos, eos = "<s>", "</s>"
    else:
        bos, eos = None, "<|im_end|>"
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATES[fam],
    }
    return tok, cfg


def tiny_config(arch: str, vocab_size: int, tok: Any) -> dict[str, Any]:
    fam = _family(arch)
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float32",
        "initializer_range": 0.05,
    }
    if arch == "llama":
        bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
        end = tok.token_to_id("<|end_of_text|>")
        cfg |= {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rope_theta": 500000.0,
            # llama3 scaling with a small original context so that it changes low frequencies here
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "tie_word_embeddings": False,
            "bos_token_id": bos,
            "eos_token_id": [end, eos],
        }
    elif arch == "mistral":
        cfg |= {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "num_key_value_heads": 1,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": tok.token_to_id("<s>"),
            "eos_token_id": tok.token_to_id("</s>"),
        }
    elif arch == "qwen2":
        cfg |= {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": tok.token_to_id("<|im_end|>"),
        }
    elif arch == "qwen3":
        cfg |= {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "head_dim": 32,  # deliberately not hidden_size / heads, as in real Qwen3 checkpoints
            "rope_theta": 1000000.0,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": tok.token_to_id("<|im_end|>"),
        }
    assert fam in _CHAT_TEMPLATES
    return cfg


def random_weights(cfg: dict[str, Any], seed: int, device: str = "cpu", dtype: Any = None) -> dict[str, Any]:
    """HF-named tensors drawn from a generator seeded with `seed` (float32 on the CPU by default;
    the GPU benchmark draws an 8B-shaped checkpoint directly in bf16 on the device)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    std = float(cfg.get("initializer_range", 0.02))
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qkv_bias = cfg["model_type"] == "qwen2"
    qk_norm = cfg["model_type"] == "qwen3"

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:  # near 1 but not 1, so a norm weight that is not loaded shows
        return (1.0 + 0.1 * torch.randn(n, generator=g, device=device, dtype=dtype)).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = w(nh * hd)
            t[p + "self_attn.k_proj.bias"] = w(nkv * hd)
            t[p + "self_attn.v_proj.bias"] = w(nkv * hd)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
    t["model.norm.weight"] = norm(h)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, h)
    return t


def save_safetensors(tensors: dict[str, Any], out: Path, shards: int = 1) -> None:
    """Write model.safetensors, or `shards` files plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    names = list(tensors)
    if shards <= 1:
        save_file(
            {k: tensors[k].contiguous() for k in names}, str(out / "model.safetensors"), {"format": "pt"}
        )
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(out / fname), {"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_model(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, shards: int = 1, dtype: str = "float32"
) -> Path:
    from .config import to_torch_dtype

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = 512
    tok, tok_cfg = build_tokenizer(arch, vocab_size)
    assert tok.get_vocab_size() <= vocab_size
    cfg = tiny_config(arch, vocab_size, tok)
    cfg["torch_dtype"] = dtype
    tensors = random_weights(cfg, seed)
    td = to_torch_dtype(dtype)
    tensors = {k: x.to(td) for k, x in tensors.items()}
    save_safetensors(tensors, out, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    eos = cfg["eos_token_id"]
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out
