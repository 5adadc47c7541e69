"""Bounded admission: how many requests (and prompt tokens) may wait for the engine at once.

A request reserves its share *before* any expensive work (templating, tokenizing), so a burst is
cut off at the door; vLLM #58192 counted only after preprocessing and let a burst through. The
reservation is corrected to the exact token count right after tokenizing, and each choice's share
is released when the engine has started it (its first token), or when the request ends.

Only the event loop thread touches this object: a check and its reservation run without an
`await` in between, which is what makes them atomic. Torch-free.
"""

from __future__ import annotations


class AdmissionControl:
    def __init__(self, max_requests: int, max_tokens: int) -> None:
        if max_requests < 1 or max_tokens < 1:
            raise ValueError("admission limits must be >= 1")
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0  # reserved now
        self.tokens = 0

    def _fits(self, requests: int, tokens: int) -> bool:
        if self.requests + requests > self.max_requests:
            return False
        # a request bigger than the token budget still gets in when nothing else waits
        return self.tokens + tokens <= self.max_tokens or self.requests == 0

    def try_reserve(self, tokens_per_part: list[int]) -> Ticket | None:
        """Reserve one slot per part (choice) and its prompt tokens, or None when full."""
        n, t = len(tokens_per_part), sum(tokens_per_part)
        if not self._fits(n, t):
            return None
        self.requests += n
        self.tokens += t
        return Ticket(self, list(tokens_per_part))


class Ticket:
    """One request's reservation; parts are released one by one or all at once (idempotent)."""

    def __init__(self, ctl: AdmissionControl, parts: list[int]) -> None:
        self._ctl = ctl
        self._parts: list[int | None] = list(parts)

    def resize(self, tokens_per_part: list[int]) -> bool:
        """Replace the estimates by exact counts. False (nothing changed) if that no longer fits."""
        assert len(tokens_per_part) == len(self._parts)
        held = sum(p for p in self._parts if p is not None)
        want = sum(t for t, p in zip(tokens_per_part, self._parts) if p is not None)
        ctl = self._ctl
        grow = want - held
        if grow > 0 and ctl.tokens + grow > ctl.max_tokens:
            live = sum(p is not None for p in self._parts)
            if ctl.requests > live:  # others wait too: this one must fit the budget
                return False
        ctl.tokens += grow
        self._parts = [t if p is not None else None for t, p in zip(tokens_per_part, self._parts)]
        return True

    def release_part(self, i: int) -> None:
        p = self._parts[i]
        if p is not None:
            self._ctl.requests -= 1
            self._ctl.tokens -= p
            self._parts[i] = None

    def release(self) -> None:
        for i in range(len(self._parts)):
            self.release_part(i)
