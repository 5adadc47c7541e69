"""OpenAI response bodies, stream chunks and SSE framing, built from engine outputs.

Pure and torch-free, like protocol.py (which parses the requests).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # both pull in torch; this module stays importable without it
    from .outputs import RequestOutput
    from .sampling import TokenLogprobs

# a logprob that JSON cannot carry (-inf) goes out as this, as vLLM does
_MIN_LOGPROB = -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _lp(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


TokenBytes = Callable[[int], bytes]  # Tokenizer.token_bytes


def token_text(raw: bytes) -> str:
    """A token's text for logprobs: its bytes as UTF-8, with the bytes of a character it only
    begins or ends written as \\xNN escapes (so distinct partial tokens stay distinct strings;
    `bytes` carries the bytes themselves)."""
    return raw.decode("utf-8", "backslashreplace")


def chat_logprobs(lps: list[TokenLogprobs], token_bytes: TokenBytes) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        raw = token_bytes(tid)
        return {"token": token_text(raw), "logprob": _lp(lp), "bytes": list(raw)}

    return {
        "content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps
        ]
    }


class TextOffsets:
    """Where each token's text starts in a choice's text (completions' text_offset), carried from
    one stream chunk to the next: a token inside a character split over several tokens starts
    where that character does."""

    def __init__(self) -> None:
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def advance(self, raw: bytes) -> int:
        """The offset of a token with these bytes, counting them in."""
        if raw and not 0x80 <= raw[0] <= 0xBF:
            # it begins a character: bytes still pending can no longer complete theirs, and the
            # text shows them as U+FFFD before this token
            self.chars += len(self._utf8.decode(b"", final=True))
        at = self.chars
        self.chars += len(self._utf8.decode(raw))
        return at


def completion_logprobs(
    lps: list[TokenLogprobs], token_bytes: TokenBytes, offsets: TextOffsets | None = None
) -> dict[str, Any]:
    """The logprobs object of these tokens, their text offsets counted on from `offsets` (a new
    choice's when None)."""
    offsets = offsets or TextOffsets()
    raws = [token_bytes(t.token_id) for t in lps]
    tokens = [token_text(r) for r in raws]
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(t.logprob) for t in lps],
        "top_logprobs": [
            {s: _lp(t.logprob)} | {token_text(token_bytes(i)): _lp(v) for i, v in t.top}
            for s, t in zip(tokens, lps)
        ],
        "text_offset": [offsets.advance(r) for r in raws],
    }


@dataclass
class ResponseHeader:
    """The fields every response and chunk of one request repeat."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def _envelope(h: ResponseHeader, obj: str, choices: list[dict[str, Any]], **rest: Any) -> dict[str, Any]:
    """What every response and chunk starts with, then `rest` (in the order given)."""
    return {"id": h.id, "object": obj, "created": h.created, "model": h.model, "choices": choices, **rest}


def chat_response(h: ResponseHeader, choices: list[dict[str, Any]], usage_: dict[str, Any]) -> dict[str, Any]:
    return _envelope(h, "chat.completion", choices, usage=usage_, system_fingerprint=None)


def chat_choice(index: int, out: RequestOutput, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": out.text},
        "logprobs": logprobs,
        "finish_reason": out.finish_reason,
    }


def completion_response(
    h: ResponseHeader, choices: list[dict[str, Any]], usage_: dict[str, Any]
) -> dict[str, Any]:
    return _envelope(h, "text_completion", choices, usage=usage_, system_fingerprint=None)


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _chunk(h: ResponseHeader, obj: str, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    # with include_usage every chunk carries "usage": null; the last one (usage_chunk) the counts
    return _envelope(h, obj, [choice], **({"usage": None} if include_usage else {}))


def chat_chunk(
    h: ResponseHeader,
    index: int,
    delta: dict[str, Any],
    *,
    logprobs: dict[str, Any] | None = None,
    reason: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return _chunk(h, "chat.completion.chunk", choice, include_usage)


def completion_chunk(
    h: ResponseHeader,
    index: int,
    text: str,
    *,
    logprobs: dict[str, Any] | None = None,
    reason: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    return _chunk(h, "text_completion", completion_choice(index, text, logprobs, reason), include_usage)


def usage_chunk(h: ResponseHeader, kind: str, usage_: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return _envelope(h, obj, [], usage=usage_)


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def model_card(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    """The served model as GET /v1/models/{model} returns it (and /v1/models lists it)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "inferfleet",
        "root": name,
        "parent": None,
        "max_model_len": max_model_len,
    }


def models_list(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created, max_model_len)]}
