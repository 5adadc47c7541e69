"""Paged attention: the metadata one engine step needs, and the backend interface.

KV cache layout, one pair per layer:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
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


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: context length including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies, so the reference path never syncs with the device
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_tables_host: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slots, v.to(v_cache.dtype))


class TorchAttentionBackend:
    """Reference implementation in plain torch ops: correct on any device, one sequence at a time.

    It gathers each sequence's blocks into a contiguous view, which the CUDA backend avoids.
    """

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        num_heads, head_dim = q.shape[1], q.shape[2]
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        bs = k_cache.shape[1]
        out = torch.empty_like(q)
        start = 0
        for qlen, ctx, table in zip(meta.query_lens_host, meta.seq_lens_host, meta.block_tables_host):
            nblk = -(-ctx // bs)
            blocks = torch.tensor(table[:nblk], dtype=torch.long, device=q.device)
            keys = k_cache.index_select(0, blocks).reshape(-1, kvh, head_dim)[:ctx]  # [L, KVH, D]
            vals = v_cache.index_select(0, blocks).reshape(-1, kvh, head_dim)[:ctx]
            qs = q[start : start + qlen]  # [n, H, D]
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                vals = vals.repeat_interleave(group, dim=1)
            scores = torch.einsum("nhd,lhd->hnl", qs.float(), keys.float()) * scale  # [H, n, L]
            if qlen > 1:
                # query j sits at absolute position ctx - qlen + j and sees keys 0..that position
                qpos = torch.arange(ctx - qlen, ctx, device=q.device).unsqueeze(1)
                kpos = torch.arange(ctx, device=q.device).unsqueeze(0)
                scores = scores.masked_fill(kpos > qpos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start : start + qlen] = torch.einsum("hnl,lhd->nhd", probs, vals.float()).to(q.dtype)
            start += qlen
        return out
