"""Rotary position embeddings (GPT-NeoX "rotate half" layout, as Llama/Mistral/Qwen checkpoints use)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeConfig


def _original_context(rope: RopeConfig) -> int:
    """The context a llama3 / YaRN scaling starts from: ModelConfig takes it from the checkpoint
    (its rope_scaling's, else its max_position_embeddings), never from the engine's max_model_len."""
    assert rope.original_max_position_embeddings is not None, f"{rope.rope_type} needs its original context"
    return rope.original_max_position_embeddings


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] (float32) and the attention scaling factor applied to cos/sin."""
    base = rope.theta
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scale = 1.0
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old = _original_context(rope)
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, blend in between
        old = _original_context(rope)
        factor = rope.factor

        def correction_dim(num_rot: float) -> float:
            return (head_dim * math.log(old / (num_rot * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rope.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        if rope.attention_factor is not None:
            scale = rope.attention_factor
        else:  # YaRN's mscale: no attention scaling unless the context is stretched (transformers)
            scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, scale


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int) -> None:
        super().__init__()
        inv, scale = inverse_frequencies(rope, head_dim)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [P, D/2]
        # kept in float32; cast to the activations' dtype at use, as transformers does
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, KVH, D]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        cos = torch.cat((cos, cos), dim=-1).to(q.dtype)
        sin = torch.cat((sin, sin), dim=-1).to(q.dtype)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
