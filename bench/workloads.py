"""The workloads of ANCHORS.md: random token ids, ignore EOS, so every length is exact."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def random_prompt(rng: random.Random, n: int, vocab: int = 128000) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def w1(seed: int = 0, n: int = 256) -> list[Request]:
    """nano-vllm's: 256 requests, prompt and output lengths each uniform in [100, 1024]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(100, 1024)
        o = rng.randint(100, 1024)
        out.append(Request(random_prompt(rng, p), o))
    return out


def fixed(isl: int, osl: int, n: int, seed: int = 0) -> list[Request]:
    """W2 (TensorRT-LLM's table): fixed input/output lengths."""
    rng = random.Random(seed)
    return [Request(random_prompt(rng, isl), osl) for _ in range(n)]


def scaled(reqs: list[Request], fraction: float) -> list[Request]:
    """The first `fraction` of `reqs` (at least one request)."""
    return reqs[: max(1, int(len(reqs) * fraction))]


def hf_mix(seed: int = 0, n: int = 128) -> list[Request]:
    """128 requests, prompt 64-1024, output 64-512 (the transformers side-by-side mix)."""
    rng = random.Random(seed)
    return [Request(random_prompt(rng, rng.randint(64, 1024)), rng.randint(64, 512)) for _ in range(n)]
