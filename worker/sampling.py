"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Each request owns a torch.Generator (seeded from its `seed`, or from the engine's seed sequence),
so a seeded request draws the same tokens whatever else is in the batch. Sampling uses the
exponential-race form of a categorical draw: argmax(p / E) with E ~ Exp(1) i.i.d., which equals
sampling from p and needs no cumulative sums. On CUDA, rows without top-k / top-p take it in one
Triton launch and one pass over the logits (kernels/elementwise.sample_rows: the Gumbel form
argmax(logit / T - log(-log U)), U from Philox keyed by a seed each row draws from its generator);
rows with a filter (and every row on CPU) take torch's softmax and exponential draw. Which form a
row takes depends only on its own request. The two forms draw from the same distribution but not
the same tokens for a given seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import kernels
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


def filter_batch(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Vectorized top-k then top-p over rows ([R, V], already temperature-scaled). One sort."""
    vocab = logits.shape[-1]
    need_k = any(0 < k < vocab for k in top_k)
    need_p = any(p < 1.0 for p in top_p)
    if not (need_k or need_p):
        return logits
    dev = logits.device
    vals, idx = logits.sort(dim=-1, descending=True)
    if need_k:
        k = to_device_index([k if 0 < k < vocab else vocab for k in top_k], dev)
        vals = vals.masked_fill(torch.arange(vocab, device=dev)[None, :] >= k[:, None], float("-inf"))
    if need_p:
        probs = torch.softmax(vals, dim=-1)
        p = _values(top_p, dev, probs.dtype)
        drop = (probs.cumsum(-1) - probs) >= p[:, None]
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, vals)


def sample_device(
    logits: torch.Tensor,
    requests: list[SampleRequest],
    generator: torch.Generator | None = None,
    greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """logits: [N, V], one row per request -> sampled ids [N] on the logits' device, and for the
    rows that asked for logprobs (chosen [R], top values [R, K], top ids [R, K]).

    The logits are float32 or a 16-bit model's own values (steps above one row on CUDA, and every
    step on CPU: widening all of them would be a pass over [N, V] of its own); the one-pass kernel
    and the argmax read 16-bit values as they are, and the rows with top-k / top-p or logprobs are
    widened to float32 first, so either form gives the same tokens and logprobs.

    Nothing here waits for the device. Rows whose request has its own generator (an explicit
    seed) draw their noise from it, one row at a time, so their tokens do not depend on the batch;
    all other rows share `generator`. `greedy`: each row's first maximum [N] int64, computed with
    the logits (a one-row decode graph's); the sampled ids are then written into it, unless some
    row bans tokens (its maximum is taken again without them).
    """
    n = logits.shape[0]
    assert n == len(requests)
    dev = logits.device
    raw = logits  # logprobs are the model's: tokens banned from the draw (min_tokens) keep theirs
    if any(r.banned_token_ids for r in requests):
        logits = logits.clone()  # every banned (row, token) pair in one indexed write
        rows = [i for i, r in enumerate(requests) for _ in r.banned_token_ids]
        cols = [t for r in requests for t in r.banned_token_ids]
        logits[to_device_index(rows, dev), to_device_index(cols, dev)] = float("-inf")
        greedy = None
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if greedy is not None:
        tokens = greedy
    elif len(random_rows) == n:  # every row is drawn below: no argmax pass over the logits
        tokens = torch.empty(n, dtype=torch.long, device=dev)
    else:
        tokens = argmax_rows(logits)
    # rows without top-k / top-p take the one-pass kernel on CUDA, the others torch's path: per row,
    # so a seeded request draws the same way whatever else the batch holds
    kernel = logits.is_cuda and kernels.AVAILABLE and logits.stride(-1) == 1
    fast: list[int] = []
    slow: list[int] = []
    for i in random_rows:
        (fast if kernel and not has_filter(requests[i].params, logits.shape[-1]) else slow).append(i)
    if fast:
        race_one_pass(logits, [requests[i] for i in fast], fast, generator, tokens)
    if slow:
        race_torch(logits, [requests[i] for i in slow], slow, generator, tokens)
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not want:
        return tokens, None
    w = to_device_index(want, dev)
    lp = torch.log_softmax(raw[w].float(), dim=-1)
    chosen = lp.gather(1, tokens[w][:, None])[:, 0]
    k = max(max(requests[i].params.logprobs or 0 for i in want), 1)
    top_v, top_i = lp.topk(k, dim=-1)
    return tokens, (chosen, top_v, top_i)


def has_filter(params: SamplingParams, vocab: int) -> bool:
    """Whether top-k or top-p removes tokens from this request's draw (race_one_pass has neither)."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def race_one_pass(
    logits: torch.Tensor,
    requests: list[SampleRequest],
    rows: list[int],
    generator: torch.Generator | None,
    tokens: torch.Tensor,
) -> None:
    """tokens[rows[j]] <- a draw for requests[j] from softmax(logits[rows[j]] / T), in one Triton
    launch (kernels/elementwise.sample_rows)."""
    from .kernels import elementwise  # Triton kernels: imported only where they can run

    dev = logits.device
    elementwise.sample_rows(
        logits,
        to_device_index(rows, dev),
        _values([r.params.temperature for r in requests], dev),
        _row_seeds([r.generator for r in requests], generator, dev),
        tokens,
    )


def race_torch(
    logits: torch.Tensor,
    requests: list[SampleRequest],
    rows: list[int],
    generator: torch.Generator | None,
    tokens: torch.Tensor,
) -> None:
    """tokens[rows[j]] <- a draw for requests[j] after temperature, top-k and top-p, in torch ops:
    softmax, then argmax(p / E) with the exponential noise E from the row's generator (seeded
    requests, one row at a time) or `generator` (all other rows in one draw)."""
    dev = logits.device
    rr = to_device_index(rows, dev)
    temps = _values([r.params.temperature for r in requests], dev)
    scaled = filter_batch(
        logits[rr].float() / temps[:, None],
        [r.params.top_k for r in requests],
        [r.params.top_p for r in requests],
    )
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    shared = [j for j, r in enumerate(requests) if r.generator is None]
    if shared:
        if len(shared) == len(requests):
            noise.exponential_(1.0, generator=generator)
        else:
            part = torch.empty((len(shared), probs.shape[1]), device=dev).exponential_(
                1.0, generator=generator
            )
            noise[to_device_index(shared, dev)] = part
    for j, r in enumerate(requests):
        if r.generator is not None:
            noise[j].exponential_(1.0, generator=r.generator)
    tokens[rr] = (probs / noise).argmax(dim=-1)


def _row_seeds(
    generators: list[torch.Generator | None], shared: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """One 62-bit Philox seed per row [R] int64 on `device`: from the row's own generator (a seeded
    request: its draws do not depend on the batch), else from `shared` (all such rows in one draw)."""
    top = 2**62
    own = [j for j, g in enumerate(generators) if g is not None]
    if not own:
        return torch.randint(0, top, (len(generators),), generator=shared, device=device)
    seeds = torch.empty(len(generators), dtype=torch.int64, device=device)
    rest = [j for j, g in enumerate(generators) if g is None]
    if rest:
        seeds[to_device_index(rest, device)] = torch.randint(
            0, top, (len(rest),), generator=shared, device=device
        )
    for j in own:
        seeds[j : j + 1] = torch.randint(0, top, (1,), generator=generators[j], device=device)
    return seeds


# greedy rows of a decode step up to this many take one argmax launch (each row split over 16
# programs up to kernels/elementwise.ARGMAX_SPLIT_ROWS rows, else a program per row): torch's
# one-pass argmax gives a single 128k-wide row to a handful of blocks (28 us per decode step on the
# H100, docs/bench/2026-11-25-h100-s4-profile-w3-before-argmax.json), and the two-pass torch form
# that replaced it took five launches (~25 us at the step boundary, ...-s5-profile-w3-fused-attn.json)
ONE_LAUNCH_MAX_ROWS = 16


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> the index of each row's first maximum [N] (as torch.argmax); a few rows on
    CUDA take one Triton launch (kernels/elementwise.argmax_rows)."""
    few = logits.shape[0] <= ONE_LAUNCH_MAX_ROWS and logits.stride(-1) == 1
    if few and logits.is_cuda and kernels.AVAILABLE:
        from .kernels import elementwise  # Triton kernels: imported only where they can run

        return elementwise.argmax_rows(logits)
    return logits.argmax(dim=-1)


def to_device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of `rows` on `device`; on CUDA a pinned, non-blocking copy (no host sync)."""
    return _values(rows, device, torch.long)


def _values(
    vals: list[float] | list[int], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return kernels.to_device(torch.tensor(vals, dtype=dtype), device)


def to_host_async(
    tokens: torch.Tensor,
    lp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    stream: torch.cuda.Stream | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None, torch.cuda.Event | None]:
    """(device tokens, host tokens, host logprob tensors, event); on CUDA the copies are async and
    the event marks their completion. With `stream` they run there, after the work queued so far
    on the current stream, so that the current stream goes on without waiting for the copy engine
    (ModelRunner.copy_out_stream)."""
    if tokens.device.type != "cuda":
        return tokens, tokens, lp, None
    src = (tokens, *(lp or ()))
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(tokens.device))
        for t in src:
            t.record_stream(stream)  # the allocator keeps them until the copies are done
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in src]
        event = torch.cuda.Event()
        event.record()
    return tokens, host[0], tuple(host[1:]) if lp is not None else None, event


def unpack_logprobs(
    lp: tuple[torch.Tensor, ...] | None, requests: list[SampleRequest], tokens: list[int]
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(requests)
    if lp is None:
        return out
    chosen, top_v, top_i = (t.tolist() for t in lp)
    j = 0
    for i, r in enumerate(requests):
        if r.params.logprobs is None:
            continue
        k = r.params.logprobs
        out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_i[j][:k], top_v[j][:k])) if k else [])
        j += 1
    return out


def sample(
    logits: torch.Tensor, requests: list[SampleRequest], generator: torch.Generator | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Synchronous form of sample_device: token ids and logprobs as Python values."""
    tokens, lp = sample_device(logits, requests, generator)
    ids = tokens.tolist()
    return ids, unpack_logprobs(lp, requests, ids)
