"""One validated configuration for the engine, built once and passed down.

`ModelConfig` is what the engine understands of a Hugging Face `config.json`; `EngineConfig` holds
the serving settings. Nothing below the engine reads the environment or files on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from .quant.spec import FP8_MIN_CAPABILITY, QuantConfig, checkpoint_kv_scales, resolve_quantization
from .quant.spec import METHODS as QUANTIZATIONS

if TYPE_CHECKING:
    import torch

# architectures -> the switches of our single decoder implementation (models/llama.py)
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
# KV cache element types: auto = the model dtype; fp8 = float8_e4m3fn with per-layer K and V scales,
# the checkpoint's (a kv_cache_scheme) or 1.0 (as vLLM's uncalibrated fp8_e4m3): values divided by
# the scale, clamped to +-448 and rounded to nearest even on write (layers/attention.py). CUDA needs
# compute capability >= 8.9 for Triton's e4m3 conversions.
KV_CACHE_DTYPES = ("auto", "fp8")


def to_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a DTYPES name (KeyError for others). torch is imported here, not at module
    level: importing this module must not import torch."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    quantization_config: dict[str, Any] | None = None
    # resolved by EngineConfig from --quantization and quantization_config (None: plain weights)
    quant: QuantConfig | None = None
    # the checkpoint stores per-layer FP8 KV cache scales (quant.spec.checkpoint_kv_scales), with
    # quantized weights or without
    kv_cache_scales: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"architectures {archs!r} are not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        switches = SUPPORTED_ARCHITECTURES[arch]
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")

        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )

        # rope: transformers 4 writes rope_theta + rope_scaling, transformers 5 writes rope_parameters
        rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        rope = RopeConfig(
            theta=theta,
            rope_type=rope_type,
            factor=float(rp.get("factor", 1.0)),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            # the context the scaling starts from; absent, the checkpoint's own (as transformers
            # does), never the max_model_len this engine happens to run with
            original_max_position_embeddings=int(
                rp.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)
            ),
            beta_fast=float(rp.get("beta_fast", 32.0)),
            beta_slow=float(rp.get("beta_slow", 1.0)),
            attention_factor=rp.get("attention_factor"),
        )

        sliding = cfg.get("sliding_window")
        if cfg.get("model_type", "").startswith("qwen") and not cfg.get("use_sliding_window", False):
            sliding = None

        def ids(v: Any) -> list[int]:
            if v is None:
                return []
            return [int(x) for x in (v if isinstance(v, list) else [v])]

        gen = generation_config or {}
        eos = ids(gen.get("eos_token_id")) or ids(cfg.get("eos_token_id"))
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        return cls(
            architecture=arch,
            model_type=str(cfg.get("model_type", "")),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=switches["qkv_bias"] or bool(cfg.get("attention_bias", False)),
            qk_norm=switches["qk_norm"],
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            bos_token_id=int(bos) if isinstance(bos, int) else None,
            quantization_config=cfg.get("quantization_config"),
            kv_cache_scales=checkpoint_kv_scales(cfg.get("quantization_config")),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        d = Path(model_dir)
        path = d / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} does not exist: a model directory needs a Hugging Face config.json")
        try:
            cfg = json.loads(path.read_text())
            gen_path = d / "generation_config.json"
            gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"invalid JSON in {d}: {e}") from None
        return cls.from_dict(cfg, gen)


def resolve_device(device: str) -> str:
    """A device setting with "auto" resolved: cuda where a CUDA device is available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype (bf16 if float32) on CUDA
    device: str = "auto"  # auto: cuda when available
    max_num_seqs: int = 256
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None  # per-step token budget (prefill chunks + decodes)
    # while sequences are decoding, the step's token budget for prompts that would finish before
    # them (None: no such limit): they fill decode steps whose matmuls have compute to spare instead
    # of steps of prefill alone (scheduler.py)
    decode_step_tokens: int | None = None
    # with decode_step_tokens and longest_first: the step's token budget once a prompt is due (its
    # generation would outlast the batch's) and while nothing decodes, where the due prompts' tokens
    # fit in 16 such steps less the decoding rows and the other prompts hold at least as many
    # (None: the whole budget; scheduler.py)
    due_step_tokens: int | None = None
    # order of admission: "fifo" (arrival), or "longest_first" (most max_tokens first; for offline
    # batches, where the longest generation bounds the batch's steps: LLM's default on CUDA)
    admission: str = "fifo"
    block_size: int = 16
    enable_prefix_caching: bool = True
    # KV pool size: an explicit number of blocks wins; else a byte budget; else (CUDA) a fraction of
    # the memory left after weights and the measured activation peak.
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 256 * 2**20
    enforce_eager: bool = False  # CUDA: skip CUDA graphs
    attention_backend: str = "auto"  # auto: triton on CUDA, torch (reference) elsewhere
    quantization: str = "none"
    # fp8 / int8 at load: quantize lm_head too (quant/spec.resolve_quantization; untied models)
    quantize_lm_head: bool = False
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8: float8_e4m3fn (KV_CACHE_DTYPES)
    seed: int = 0
    served_model_name: str | None = None
    model_config: ModelConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        self.model_config = ModelConfig.from_pretrained(self.model)
        self.device = resolve_device(self.device)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidRequestError(f"device must be cpu or cuda, got {self.device!r}", param="device")
        if self.device != "cpu" and not torch.cuda.is_available():
            raise InvalidRequestError(
                "device cuda was asked for but no CUDA device is available", param="device"
            )
        if self.dtype == "auto":
            if self.device == "cpu":
                self.dtype = "float32"
            else:
                ck = self.model_config.torch_dtype
                self.dtype = ck if ck in ("bfloat16", "float16") else "bfloat16"
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", param="dtype")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidRequestError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}",
                param="quantization",
            )
        capability = torch.cuda.get_device_capability(self.device) if self.device != "cpu" else None
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
                param="kv_cache_dtype",
            )
        if self.kv_cache_dtype == "fp8" and capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
            raise InvalidRequestError(
                "kv_cache_dtype fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper) for "
                f"Triton's float8_e4m3 conversions; this one is {capability[0]}.{capability[1]}: "
                "use kv_cache_dtype auto",
                param="kv_cache_dtype",
            )
        quant = resolve_quantization(
            self.quantization,
            self.model_config.quantization_config,
            self.device,
            capability,
            self.dtype,
            quantize_lm_head=self.quantize_lm_head,
            tied_embeddings=self.model_config.tie_word_embeddings,
        )
        # a GPTQ or FP8 checkpoint served with quantization "none" reports what it runs
        self.quantization = quant.method if quant is not None else "none"
        self.model_config = replace(self.model_config, quant=quant)
        for name in ("max_num_seqs", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}", param=name)
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise InvalidRequestError("block_size must be a power of two <= 256", param="block_size")
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            # sliding-window attention is not implemented: serve only contexts the window covers
            limit = min(limit, self.model_config.sliding_window)
        if self.max_model_len is None:
            self.max_model_len = limit
        elif not isinstance(self.max_model_len, int) or not (1 <= self.max_model_len <= limit):
            raise InvalidRequestError(
                f"max_model_len must be in [1, {limit}] for this model, got {self.max_model_len!r}",
                param="max_model_len",
            )
        if self.max_num_batched_tokens is None:
            # big enough that one step's matmuls run near peak on a GPU; small on CPU for latency
            self.max_num_batched_tokens = max(8192 if self.device != "cpu" else 2048, self.max_num_seqs)
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1", param="max_num_batched_tokens")
        for name in ("decode_step_tokens", "due_step_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InvalidRequestError(f"{name} must be >= 1 or None", param=name)
        if self.admission not in ("fifo", "longest_first"):
            raise InvalidRequestError("admission must be fifo or longest_first", param="admission")
        if self.due_step_tokens is not None and (
            self.decode_step_tokens is None or self.admission != "longest_first"
        ):
            # its first steps cap the queue's head, which only longest_first makes the longest generation
            raise InvalidRequestError(
                "due_step_tokens needs decode_step_tokens and admission longest_first",
                param="due_step_tokens",
            )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidRequestError(
                "attention_backend must be auto, torch or triton", param="attention_backend"
            )
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise InvalidRequestError(
                "gpu_memory_utilization must be in (0, 1]", param="gpu_memory_utilization"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError("num_kv_blocks must be >= 1", param="num_kv_blocks")

    @property
    def torch_dtype(self):
        return to_torch_dtype(self.dtype)

    @property
    def kv_torch_dtype(self):
        """The KV cache element type: the model dtype (auto) or torch.float8_e4m3fn (fp8)."""
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.torch_dtype

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name
