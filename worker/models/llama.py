"""The decoder for Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3 checkpoints.

The families differ only by switches in ModelConfig: GQA (num_kv_heads), rope scaling, biases on
q/k/v (Qwen2), per-head RMSNorm on q and k before rotary (Qwen3), an explicit head_dim (Qwen3),
tied embeddings. Parameter names follow transformers' modules, except that q/k/v load into one
`qkv_proj` and gate/up into one `gate_up_proj` (fewer, larger matmuls).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..config import ModelConfig
from ..errors import ModelLoadError, UnsupportedModelError
from ..layers.attention import AttentionBackend, AttentionMetadata
from ..layers.linear import Linear
from ..layers.norm import PendingNorm, RMSNorm
from ..layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from ..kernels.elementwise import StagedInputs

log = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint name fragment -> (our module fragment, shard index)
_STACKED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# an FP8 KV cache's per-layer scales (ModelConfig.kv_cache_scales): compressed-tensors' names, then
# AutoFP8's -> the attention module's attribute
_KV_SCALES = {
    ".self_attn.k_scale": ("k_scale",),
    ".self_attn.v_scale": ("v_scale",),
    ".self_attn.k_proj.output_scale": ("k_scale",),
    ".self_attn.v_proj.output_scale": ("v_scale",),
    ".self_attn.kv_scale": ("k_scale", "v_scale"),  # older checkpoints: one scale for both, as vLLM reads it
}
_KV_SUFFIXES = tuple(_KV_SCALES)


def _checkpoint_modules(name: str) -> list[str]:
    """Our module `name` -> the checkpoint modules stacked into it, in shard order (q/k/v_proj for a
    qkv_proj, gate/up_proj for a gate_up_proj), or [name]."""
    base, _, leaf = name.rpartition(".")
    stacked = sorted((idx, frag) for frag, (ours, idx) in _STACKED.items() if ours == f".{leaf}.")
    return [f"{base}.{frag.strip('.')}" for _, frag in stacked] or [name]


def _our_name(ck_name: str) -> tuple[str, int | None]:
    """A checkpoint tensor's parameter name here, and its shard in a stacked layer (None if not)."""
    for frag, (ours, idx) in _STACKED.items():
        if frag in ck_name:
            return ck_name.replace(frag, ours), idx
    return ck_name, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.qkv_bias, quant=cfg.quant
        )
        self.o_proj = Linear(self.q_size, [cfg.hidden_size], quant=cfg.quant, follows_attention=True)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.backend = backend
        self.rotary = rotary
        # an fp8 KV cache holds K / k_scale and V / v_scale (layers/attention.kv_scales): the
        # checkpoint's scales where it has them (load_weights), else 1.0
        self.k_scale = 1.0
        self.v_scale = 1.0

    def attend(
        self, positions: torch.Tensor, x: torch.Tensor | PendingNorm, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention up to o_proj's input (the decoder layer fuses o_proj with the next norm)."""
        return self.backend.forward(self, positions, self.qkv_proj(x), kv[0], kv[1], meta)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.o_proj(self.attend(positions, x, kv, meta))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [self.inter, self.inter], quant=cfg.quant)
        self.down_proj = Linear(self.inter, [cfg.hidden_size], quant=cfg.quant)

    def act(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        """silu(gate) * up: down_proj's input (the decoder layer fuses down_proj with the next norm).
        One row on CUDA takes it from the gate/up projection's own launch (Linear.silu_mul)."""
        fused = self.gate_up_proj.silu_mul(x)
        if fused is not None:
            return fused
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda and kernels.AVAILABLE:
            from ..kernels.elementwise import silu_and_mul

            return silu_and_mul(gate_up)
        gate, up = gate_up.split([self.inter, self.inter], dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor | PendingNorm,
        residual: torch.Tensor,
        kv: KVCache,
        meta: AttentionMetadata,
        next_norm: RMSNorm,
        next_proj: Linear | None = None,
    ) -> tuple[torch.Tensor | PendingNorm, torch.Tensor]:
        """x: this layer's input, normalized by input_layernorm (or pending: PendingNorm);
        residual: the stream. Returns next_norm's output (the next layer's input_layernorm, or the
        final norm) and the new stream: each projection that feeds the stream adds into it and
        normalizes it in one launch where the kernels can (Linear.add_norm), or leaves the norm to
        the projection after it (the post-attention norm to gate/up, next_norm to `next_proj`)."""
        o = self.self_attn.attend(positions, x, kv, meta)
        mlp = self.mlp
        x, residual = self.self_attn.o_proj.add_norm(
            o, residual, self.post_attention_layernorm, mlp.gate_up_proj
        )
        return mlp.down_proj.add_norm(mlp.act(x), residual, next_norm, next_proj)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_position)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderModel(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, hidden]; logits for rows."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, backend, max_position)
        # a GPTQ or FP8 checkpoint may store lm_head quantized too, or fp8 / int8 at load may quantize
        # it (QuantConfig.lm_head); then it is never tied to the embedding, which stays in the model dtype
        self.lm_head = Linear(
            cfg.hidden_size, [cfg.vocab_size], quant=cfg.quant if self.quantized_lm_head else None
        )
        if cfg.quant is not None:
            self._plain_where_stored_plain()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        feed: tuple[torch.Tensor, torch.Tensor] | None = None,
        embedded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`feed`: see embed. `embedded`: embed's (residual, x) for these tokens, computed before
        (a decode graph starts from them); then input_ids and feed are not read."""
        layers = self.model.layers
        assert len(kv_caches) == len(layers), "one KV cache per layer (the last layer applies the final norm)"
        residual, x = embedded if embedded is not None else self.embed(input_ids, feed)
        next_norms = [*(layer.input_layernorm for layer in layers[1:]), self.model.norm]
        # the last layer's norm is computed in full: the model's output is the final hidden state
        next_projs = [*(layer.self_attn.qkv_proj for layer in layers[1:]), None]
        x: torch.Tensor | PendingNorm
        for layer, kv, nxt, proj in zip(layers, kv_caches, next_norms, next_projs):
            x, residual = layer(positions, x, residual, kv, meta, nxt, proj)
        assert isinstance(x, torch.Tensor)
        return x

    def embed(
        self,
        input_ids: torch.Tensor,
        feed: tuple[torch.Tensor, torch.Tensor] | None = None,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        staged: StagedInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, first layer's normalized input) for input_ids [T].

        `feed` = (rows [T], previous [R]): where rows[t] >= 0, token t's id is previous[rows[t]]
        (the previous step's sampled ids, still on the device) instead of input_ids[t]. On CUDA one
        launch does the feed, the embedding and the norm (kernels/elementwise.embed_rmsnorm, which
        also takes its `out` buffers and `staged` inputs to move); elsewhere torch ops."""
        first = self.model.layers[0].input_layernorm
        emb = self.model.embed_tokens.weight
        if emb.is_cuda and kernels.AVAILABLE:
            from ..kernels.elementwise import embed_rmsnorm

            return embed_rmsnorm(input_ids, emb, first.weight, first.eps, feed, out, staged)
        assert out is None and staged is None, "preallocated outputs and staged inputs: CUDA only"
        if feed is not None:
            rows, prev = feed
            input_ids = torch.where(rows >= 0, prev[rows.clamp(min=0)], input_ids)
        residual = self.model.embed_tokens(input_ids)
        return residual, first(residual)

    def _plain_where_stored_plain(self) -> None:
        """Decoder projections the checkpoint stores unquantized (a compressed-tensors FP8 checkpoint
        whose `ignore` lists them, QuantConfig.stores_quantized) stay in the model dtype, as plain
        layers. A merged layer (qkv, gate/up) takes one precision: if some of its checkpoint modules
        are quantized and others not, it stays quantized and the plain ones are quantized at load."""
        quant = self.config.quant
        assert quant is not None
        for name, module in list(self.model.named_modules(prefix="model")):
            if not isinstance(module, Linear) or module.method is None:
                continue
            parts = _checkpoint_modules(name)
            stored = [quant.stores_quantized(m) for m in parts]
            if not any(stored):
                parent, _, attr = name.rpartition(".")
                plain = Linear(
                    module.in_features,
                    module.output_sizes,
                    bias=module.bias is not None,
                    follows_attention=module.follows_attention,
                )
                setattr(self.get_submodule(parent), attr, plain)
            elif not all(stored):
                some = f"{name}: the checkpoint quantizes only some of {', '.join(parts)}"
                if quant.method == "gptq":  # packed codes cannot be made at load
                    raise UnsupportedModelError(
                        f"{some}; a merged GPTQ layer needs all of them quantized or none"
                    )
                log.warning("%s; the others are quantized at load", some)

    @property
    def quantized_lm_head(self) -> bool:
        return self.config.quant is not None and self.config.quant.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] logits for sampling: float32 for float32 models and one-row CUDA launches, else
        the model's 16-bit values (Linear.sampling_output)."""
        return self.lm_head.sampling_output(hidden)

    def compute_logits_argmax(self, hidden: torch.Tensor, best: torch.Tensor) -> torch.Tensor | None:
        """compute_logits for one row (CUDA graphs) whose launch also folds the row's first maximum
        into `best` (Linear.float_output_argmax), or None where the lm_head's kernel cannot."""
        return self.lm_head.float_output_argmax(hidden, best)

    # -- weights ---------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into parameters; every parameter must be written exactly once."""
        params = dict(self.named_parameters())
        pending: dict[str, set[int]] = {}
        tied = self.config.tie_word_embeddings and not self.quantized_lm_head
        if tied:
            # transformers ties lm_head to the embedding and ignores any stored lm_head copy
            self.lm_head.weight = self.model.embed_tokens.weight
            params = dict(self.named_parameters())
        # linear layers whose tensors their quant method loads (Linear.method is set at construction)
        quantized: dict[str, Linear] = {}
        owners: dict[str, nn.Module] = {}  # module name -> module, for every parameter's owner
        for name in params:
            owner_name, _, pname = name.rpartition(".")
            owner = owners[owner_name] = self.get_submodule(owner_name)
            if isinstance(owner, Linear) and owner.method is not None:
                quantized[owner_name] = owner
                if pname in owner.method.optional_params:
                    continue
            pending[name] = set(range(len(owner.output_sizes) if isinstance(owner, Linear) else 1))
        unused = self._unused_scale_suffixes()
        kv_scales = self.config.kv_cache_scales
        kv_scaled: set[str] = set()
        # the config says lm_head is stored quantized (not quantized here at load)
        stored_quantized_head = self.quantized_lm_head and self.config.quant.from_checkpoint
        for ck_name, tensor in weights:
            if ck_name.endswith(_IGNORED_SUFFIXES) or (tied and ck_name == "lm_head.weight"):
                continue
            kv_scale = kv_scales and ck_name.endswith(_KV_SUFFIXES)
            if kv_scale or (unused and ck_name.endswith(unused)):
                # static activation scales of an FP8 checkpoint: read, not applied
                # (QuantConfig.static_input_scales); KV cache scales: set on their attention layer
                if tensor.numel() != 1:
                    raise ModelLoadError(
                        f"{ck_name}: a per-tensor scale is one element, got {tuple(tensor.shape)}"
                    )
                if kv_scale:
                    self._set_kv_scale(ck_name, float(tensor.float()))
                    kv_scaled.add(ck_name)
                continue
            target, shard = _our_name(ck_name)
            owner_name, _, pname = target.rpartition(".")
            qlayer = quantized.get(owner_name)
            if target not in params and not (qlayer is not None and pname in qlayer.method.extra_tensors):
                raise ModelLoadError(
                    f"checkpoint tensor {ck_name!r} has no place in {self.config.architecture}"
                )
            if ck_name == "lm_head.weight" and stored_quantized_head and tensor.dtype.itemsize > 1:
                # the config says lm_head is stored quantized; a 16/32-bit one means they disagree
                # (FP8 layers would otherwise quantize it at load, silently)
                raise ModelLoadError(
                    f"quantization_config says lm_head is stored quantized ({self.config.quant.describe()}), but "
                    f"the checkpoint's lm_head.weight is {tensor.dtype}; if the recipe left it unquantized, the "
                    "config should list lm_head in `ignore` (compressed-tensors) or `ignored_layers` (AutoFP8)"
                )
            if qlayer is not None and pname != "bias":
                for written in qlayer.method.load(qlayer, pname, shard or 0, tensor, ck_name):
                    pending.get(f"{owner_name}.{written}", set()).discard(shard or 0)
                continue
            param = params[target]
            if shard is None:
                dest, shard_id = param.data, 0
            else:
                owner = owners[owner_name]
                assert isinstance(owner, Linear)
                lo, hi = owner.shard_range(shard)
                dest, shard_id = param.data[lo:hi], shard
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{ck_name}: checkpoint shape {tuple(tensor.shape)} does not match {tuple(dest.shape)} "
                    "implied by config.json"
                )
            dest.copy_(tensor)
            pending[target].discard(shard_id)
        missing = sorted(n for n, s in pending.items() if s)
        if missing:
            hint = ""
            if self.quantized_lm_head and any(n.startswith("lm_head.") for n in missing):
                hint = (
                    " (quantization_config says lm_head is stored quantized: GPTQ `lm_head: true`, or FP8 "
                    "config_groups targeting it without `ignore`; a tied model stores no lm_head of its own)"
                    if stored_quantized_head
                    else " (quantize_lm_head quantizes the checkpoint's own lm_head.weight, which it lacks)"
                )
            raise ModelLoadError(f"checkpoint lacks tensors for: {', '.join(missing[:8])}{hint}")
        for layer in quantized.values():
            layer.method.process_after_loading(layer)
        self._bound_normed_inputs()
        if self.config.quant is not None:
            log.info("quantized projections: %s", self.config.quant.describe())
        if kv_scales:
            log.info(
                "KV cache scales for %d of %d attention layers (applied with kv_cache_dtype fp8; 1.0 "
                "where the checkpoint has none)",
                len({n.rpartition(".self_attn.")[0] for n in kv_scaled}),
                len(self.model.layers),
            )

    def _bound_normed_inputs(self) -> None:
        """Linear.input_bound of the projections that read an RMSNorm's output (qkv, gate/up, lm_head):
        |w_i x_i / rms(x)| <= sqrt(K) max |w|, since no |x_i| exceeds sqrt(K) rms(x); 1% over it
        for the rounding to the activations' dtype."""
        pairs = [(self.model.norm, self.lm_head)]
        for layer in self.model.layers:
            pairs += [
                (layer.input_layernorm, layer.self_attn.qkv_proj),
                (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
            ]
        for norm, proj in pairs:
            w = norm.weight.detach()
            proj.input_bound = 1.01 * math.sqrt(w.numel()) * float(w.abs().max())

    def _set_kv_scale(self, ck_name: str, value: float) -> None:
        """A checkpoint's KV cache scale (a name of _KV_SCALES) onto its attention layer."""
        suffix = next(sfx for sfx in _KV_SCALES if ck_name.endswith(sfx))
        attn_name = ck_name[: -len(suffix)] + ".self_attn"
        try:
            attn = self.get_submodule(attn_name)
        except AttributeError:
            raise ModelLoadError(
                f"{ck_name}: no attention layer {attn_name} for this KV cache scale"
            ) from None
        # the kernels multiply by the float32 reciprocal: it must be finite too
        if not (math.isfinite(value) and value > 0.0 and math.isfinite(float(torch.tensor(1.0 / value)))):
            raise ModelLoadError(
                f"{ck_name}: a KV cache scale must be finite and positive (with a finite float32 "
                f"reciprocal), got {value}"
            )
        for attr in _KV_SCALES[suffix]:
            setattr(attn, attr, value)

    def _unused_scale_suffixes(self) -> tuple[str, ...]:
        """Per-tensor scales an FP8 checkpoint stores that this engine reads and does not apply
        (static activation scales; KV cache scales are applied: _KV_SCALES)."""
        quant = self.config.quant
        suffixes: tuple[str, ...] = ()
        if quant is not None and quant.static_input_scales:
            suffixes += (".input_scale", ".input_zero_point")
        return suffixes

    def keep_checkpoint_dtype(self, name: str) -> bool:
        """Checkpoint tensors the loader must not convert to the model dtype: quantization scales
        (GPTQ's fp16 scales would lose bits as bf16; FP8 weight scales are kept exact), and the float
        weights of layers that quantize them at load, so that their codes and scales come from the
        checkpoint's values (a float32 checkpoint served in bf16 is not rounded twice). KV cache
        scales stay float32 with plain weights too (a KV-cache-only checkpoint)."""
        if self.config.kv_cache_scales and name.endswith(_KV_SUFFIXES):
            return True
        if self.config.quant is None:
            return False
        if name.endswith((".scales", ".weight_scale")):
            return True
        if not name.endswith(".weight"):
            return False
        owner_name = _our_name(name)[0].rpartition(".")[0]
        try:
            owner = self.get_submodule(owner_name)
        except AttributeError:  # no such module: load_weights names the stray tensor
            return False
        return isinstance(owner, Linear) and owner.method is not None
