"""Paged attention: the metadata one engine step needs, and the backend interface.

KV cache layout, one pair per layer:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]  (model dtype, or float8_e4m3fn)
                      stored [num_blocks, num_kv_heads, block_size, head_dim] (alloc_kv_cache)
    flat slot of token t of a sequence = block_table[t // block_size] * block_size + t % block_size

A step's batch is "varlen": the new tokens of every scheduled sequence are concatenated, decodes
(1 token) and prefill chunks (many) alike. Sequence i owns q rows query_start_loc[i]:query_start_loc[i+1],
its context (cached tokens plus the new ones) is seq_lens[i] long, and its new tokens sit at the end
of that context (causal). Backends write the new K/V into the cache first, then attend over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# kv_cache_dtype fp8: float8_e4m3fn (quant/fp8.py's FP8_DTYPE), one scale per layer for K and one for
# V: the cache holds value / scale, and readers multiply by the scale. The scales are the checkpoint's
# (a compressed-tensors `kv_cache_scheme`: k_scale / v_scale per attention layer; AutoFP8's
# k_proj / v_proj output_scale), else 1.0. Scaled values are clamped to +-448 (FP8_MAX, the largest
# finite e4m3 value) before the cast, so an outlier saturates instead of becoming NaN, and the cast
# rounds to nearest even.
from ..quant.fp8 import FP8_DTYPE as KV_FP8_DTYPE
from ..quant.fp8 import FP8_MAX as KV_FP8_MAX

# block-table rows are padded to a multiple of this many entries: Triton specializes integer
# arguments on being 1 or a multiple of 16, so every other row width (the attention kernels' table
# stride) compiled another variant at the first step that had it, ~1 s on a new pod while a request
# waited (bench/compile_watch.py, docs/benchmarks.md twelfth session)
TABLE_ALIGN = 16


def table_width(blocks: int) -> int:
    """The padded width of block-table rows holding up to `blocks` entries (at least TABLE_ALIGN)."""
    return max(1, -(-blocks // TABLE_ALIGN)) * TABLE_ALIGN


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: context length including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    # host copies, so the reference path never syncs with the device
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # split-KV decode (CUDA backend): number of context splits and its float32 workspace
    num_splits: int = 1
    split_workspace: tuple[torch.Tensor, torch.Tensor] | None = None
    # CUDA backend: int32 [P, 2] (sequence, query tile) pairs that the attention launch covers, one
    # program each (kernels/paged_attention.fill_tile_map): a grid that does not depend on the batch,
    # for steps with prefill chunks inside CUDA graphs (cuda_graphs.MixedGraphs); None: the grid
    # covers every sequence's tiles up to max_query_len
    tile_map: torch.Tensor | None = None


class AttentionLayer(Protocol):
    """What a backend needs from the decoder's attention module."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    rotary: torch.nn.Module
    # an fp8 cache's per-layer scales (stored = value / scale); 1.0 without checkpoint scales
    k_scale: float
    v_scale: float


def kv_scales(layer: AttentionLayer, k_cache: torch.Tensor) -> tuple[float, float]:
    """(K scale, V scale) of a layer's cache: the layer's for an fp8 cache, else (1.0, 1.0) (a
    16-bit cache stores the values as they are)."""
    if k_cache.dtype != KV_FP8_DTYPE:
        return 1.0, 1.0
    return layer.k_scale, layer.v_scale


def to_fp8_cache(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Values -> an fp8 cache's elements: x / scale (as x times the float32 reciprocal, as the
    kernels compute it), clamped to +-FP8_MAX, rounded to e4m3."""
    if scale != 1.0:
        x = x.float() * (1.0 / scale)
    return x.clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8_DTYPE)


class AttentionBackend(Protocol):
    """From the fused QKV projection to the attention output, K/V written into the cache on the way.

    Backends own everything between the two projections (q/k norm, rotary, cache write, attention)
    so a fused implementation can do it in a couple of kernels.
    """

    name: str

    def forward(
        self,
        layer: AttentionLayer,
        positions: torch.Tensor,  # [T]
        qkv: torch.Tensor,  # [T, (H + 2 KVH) * D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H * D]
        ...


def qkv_heads(
    layer: AttentionLayer, positions: torch.Tensor, qkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [T, (H + 2 KVH) * D] -> q [T, H, D], k and v [T, KVH, D]
    (views), with the q/k norm (models that have one) and rotary embedding applied to q and k."""
    t, h, kvh, d = qkv.shape[0], layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    if layer.q_norm is not None and layer.k_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    q, k = layer.rotary(positions, q, k)
    return q, k, v


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Write new K/V rows into their slots (any cache strides: alloc_kv_cache's are permuted); an
    fp8 cache stores them divided by `kv_scale` (to_fp8_cache)."""
    bs = k_cache.shape[1]
    blk, off = slots // bs, slots % bs
    if k_cache.dtype == KV_FP8_DTYPE:
        k, v = to_fp8_cache(k, kv_scale[0]), to_fp8_cache(v, kv_scale[1])
        # index_put_ has no float8 kernel on the CPU: copy the (same-sized) bytes instead
        k_cache.view(torch.uint8)[blk, off] = k.view(torch.uint8)
        v_cache.view(torch.uint8)[blk, off] = v.view(torch.uint8)
        return
    k_cache[blk, off] = k.to(k_cache.dtype)
    v_cache[blk, off] = v.to(v_cache.dtype)


def alloc_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's zeroed (K, V) caches, indexed [block, slot, kv head, channel] and stored
    [block, kv head, slot, channel] (a permuted view): one KV head's page is one contiguous run of
    block_size * head_dim elements, which the attention kernel reads for that head (fp8 cache:
    2,366 vs 2,290 GB/s at batch 256; bf16 the same; docs/benchmarks.md)."""
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device).permute(0, 2, 1, 3)
    v = torch.zeros(shape, dtype=dtype, device=device).permute(0, 2, 1, 3)
    return k, v


class TorchAttentionBackend:
    """Reference implementation in plain torch ops: correct on any device, one sequence at a time.

    It gathers each sequence's blocks into a contiguous view, which the CUDA backend avoids.
    """

    name = "torch"

    def forward(
        self,
        layer: AttentionLayer,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = qkv_heads(layer, positions, qkv)
        out = self.attend(q, k, v, k_cache, v_cache, meta, layer.scale, kv_scales(layer, k_cache))
        return out.reshape(qkv.shape[0], layer.num_heads * layer.head_dim)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """Write the new K/V (write_kv), then attend over each sequence's context in float32; an
        fp8 cache's elements are multiplied back by `kv_scale` (a 16-bit cache ignores it, as
        write_kv and the kernels do)."""
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scale)
        num_heads, head_dim = q.shape[1], q.shape[2]
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        bs = k_cache.shape[1]
        out = torch.empty_like(q)
        start = 0
        for i, (qlen, ctx) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            nblk = -(-ctx // bs)
            blocks = meta.block_tables[i, :nblk].long()
            keys = k_cache.index_select(0, blocks).reshape(-1, kvh, head_dim)[:ctx]  # [L, KVH, D]
            vals = v_cache.index_select(0, blocks).reshape(-1, kvh, head_dim)[:ctx]
            # the math is float32: widen once (exact from bf16/fp16 and from an fp8 cache)
            keys, vals = keys.float(), vals.float()
            if k_cache.dtype == KV_FP8_DTYPE and kv_scale != (1.0, 1.0):
                keys, vals = keys * kv_scale[0], vals * kv_scale[1]
            qs = q[start : start + qlen]  # [n, H, D]
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                vals = vals.repeat_interleave(group, dim=1)
            scores = torch.einsum("nhd,lhd->hnl", qs.float(), keys) * scale  # [H, n, L]
            if qlen > 1:
                # query j sits at absolute position ctx - qlen + j and sees keys 0..that position
                qpos = torch.arange(ctx - qlen, ctx, device=q.device).unsqueeze(1)
                kpos = torch.arange(ctx, device=q.device).unsqueeze(0)
                scores = scores.masked_fill(kpos > qpos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start : start + qlen] = torch.einsum("hnl,lhd->nhd", probs, vals).to(q.dtype)
            start += qlen
        return out


# decode batches of up to this many rows rotate q and K and write the new K/V inside the attention
# kernel (paged_attention's new_kv: one launch per layer fewer, which pays at batch 1); larger ones
# take rope_and_cache first. H100, 2026-11-26 (docs/benchmarks.md, eighth session): fused at every
# size, FP8 W2 1000/1000 fell from 12,196 to 11,414 out tok/s (bisected to the commit that fused it);
# with this limit 12,159, and bf16 W1 8,715 against 8,603 (limits of 8 and 16: 8,738 and 8,685)
FUSED_DECODE_MAX_ROWS = 64


class TritonAttentionBackend:
    """CUDA: q/k norm in place, then one paged-attention kernel that also rotates q and K and writes
    the new K/V into the cache for decode steps of up to FUSED_DECODE_MAX_ROWS rows, or one fused
    rotary + cache-write kernel before it for larger decode steps and steps with prefill chunks."""

    name = "triton"

    def forward(
        self,
        layer: AttentionLayer,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output [t, heads * head_dim], into `out` (contiguous, that shape) where given."""
        from ..kernels.elementwise import rmsnorm, rope_and_cache
        from ..kernels.paged_attention import NewKV, paged_attention

        t, h, kvh, d = qkv.shape[0], layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = qkv[:, : h * d].view(t, h, d)
        k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            rmsnorm(q, layer.q_norm.weight, layer.q_norm.eps, out=q)
            rmsnorm(k, layer.k_norm.weight, layer.k_norm.eps, out=k)
        rotary = layer.rotary
        kv_scale = kv_scales(layer, k_cache)
        new_kv = None
        if meta.max_query_len == 1 and t <= FUSED_DECODE_MAX_ROWS and meta.tile_map is None:
            v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
            new_kv = NewKV(k, v, positions, rotary.cos, rotary.sin, meta.slot_mapping)
        else:
            rope_and_cache(
                qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache, meta.slot_mapping, h, kvh, d,
                kv_scale=kv_scale,
            )  # fmt: skip
        if out is None:
            out = torch.empty((t, h * d), dtype=qkv.dtype, device=qkv.device)
        assert out.shape == (t, h * d) and out.is_contiguous()
        paged_attention(
            q,
            k_cache,
            v_cache,
            out.view(t, h, d),
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            layer.scale,
            num_splits=meta.num_splits,
            workspace=meta.split_workspace,
            new_kv=new_kv,
            kv_scale=kv_scale,
            tile_map=meta.tile_map,
        )
        return out
