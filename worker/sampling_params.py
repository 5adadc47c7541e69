"""Per-request generation settings (vLLM's shape), validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report per token; 0 = only the chosen one
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        self.verify()

    @property
    def stop_strings(self) -> list[str]:
        assert isinstance(self.stop, list)
        return self.stop

    @property
    def greedy(self) -> bool:
        # below 1e-5 the scaled logits overflow; such temperatures mean greedy anyway
        return self.temperature < 1e-5

    def verify(self) -> None:
        def bad(param: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(message, param=param)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "min_tokens must not exceed max_tokens")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise bad("top_p", f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise bad("top_k", f"top_k must be an integer >= -1 (0 or -1 disables it), got {k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (0 <= self.seed < 2**63)
        ):
            raise bad("seed", f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        stops = self.stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop", "stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(len(s) == 0 or len(s) > MAX_STOP_STRING_LEN for s in stops):
            raise bad("stop", f"stop strings must have 1 to {MAX_STOP_STRING_LEN} characters")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise bad("stop_token_ids", "stop_token_ids must be a list of integers")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not (0 <= self.logprobs <= MAX_LOGPROBS)
        ):
            raise bad("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "ignore_eos must be a boolean")
