"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Each request owns a torch.Generator (seeded from its `seed`, or from the engine's seed sequence),
so a seeded request draws the same tokens whatever else is in the batch. Sampling uses the
exponential-race form of a categorical draw: argmax(p / E) with E ~ Exp(1) i.i.d., which equals
sampling from p and needs no cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: list[int]  # EOS/stop ids while below min_tokens


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] float32 (already divided by temperature); filtered entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, requests: list[SampleRequest]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [N, V] float32, one row per request. Returns token ids and (if asked) logprobs."""
    n = logits.shape[0]
    assert n == len(requests)
    if any(r.banned_token_ids for r in requests):
        logits = logits.clone()
    for i, r in enumerate(requests):
        if r.banned_token_ids:
            logits[i, r.banned_token_ids] = float("-inf")
    greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    if len(greedy_rows) == n:
        tokens = logits.argmax(dim=-1)
    else:
        if greedy_rows:
            gr = torch.tensor(greedy_rows, device=logits.device)
            tokens[gr] = logits[gr].argmax(dim=-1)
        for i, r in enumerate(requests):
            if r.params.greedy:
                continue
            row = apply_top_k_top_p(logits[i] / r.params.temperature, r.params.top_k, r.params.top_p)
            probs = torch.softmax(row, dim=-1)
            e = torch.empty_like(probs).exponential_(1.0, generator=r.generator)
            tokens[i] = (probs / e).argmax()
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * n
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        k = max(requests[i].params.logprobs or 0 for i in want)
        top_v, top_i = lp.topk(max(k, 1), dim=-1) if k else (None, None)
        for j, i in enumerate(want):
            t = token_list[i]
            kk = requests[i].params.logprobs or 0
            top = (
                list(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist())) if kk and top_i is not None else []
            )
            logprobs[i] = TokenLogprobs(t, float(lp[j, t]), top)
    return token_list, logprobs
