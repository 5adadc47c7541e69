"""Tokenizer (Hugging Face `tokenizers`), chat templates (jinja2) and incremental detokenization."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, ModelLoadError

# Texts longer than this are encoded through encode_batch, which lets go of the GIL while the Rust
# side works (encode holds it: a 4 MB prompt stalled the server's event loop for 2.4 s although it
# is tokenized in a worker thread). Shorter ones take encode, which is faster for them.
_GIL_FREE_CHARS = 1 << 14

# How many tokens before the unread ones are decoded again, so that merges and leading spaces that
# depend on the previous tokens come out right (the same window vLLM and TGI use).
_PREFIX_WINDOW = 5


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character byte-level BPE
    vocabularies write it with (printable Latin-1 as itself, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(shifted)}


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} does not exist: the model directory needs a tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = d / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        jinja_path = d / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template
        self._compiled_template: Any = None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._bytes_of: Any = None  # token_bytes' lookup, made on first use (logprobs only)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the decoded text, on their own: for a token that is part of
        a multi-byte character, those bytes only (its decode alone would be U+FFFD). Byte-level
        BPE vocabularies (GPT-2's byte-to-unicode alphabet) map back byte by byte; SentencePiece
        ones turn "▁" into a space and <0xNN> byte-fallback pieces into their byte; added
        (special) tokens are their content."""
        if self._bytes_of is None:
            self._bytes_of = self._token_bytes_reader()
        return self._bytes_of(token_id)

    def _token_bytes_reader(self) -> Any:
        # the decoder's JSON alone (to_str() would serialise the whole vocabulary, megabytes)
        decoder = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder is not None else {}
        kinds = {d.get("type") for d in (decoder.get("decoders") or [decoder])}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        if "ByteLevel" in kinds:
            to_byte = {c: b for b, c in _byte_to_unicode().items()}

            def piece(token: str) -> bytes:
                return (
                    bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else token.encode()
                )
        else:

            def piece(token: str) -> bytes:
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    return bytes([int(token[3:5], 16)])
                return token.replace("\u2581", " ").encode()

        @functools.lru_cache(maxsize=1 << 16)
        def bytes_of(token_id: int) -> bytes:
            if token_id in added:
                return added[token_id].encode()
            token = self._tok.id_to_token(token_id)
            return b"" if token is None else piece(token)

        return bytes_of

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's template. Template errors are the caller's bad input."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions instead", param="messages"
            )
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._compiled_template is None:

            def raise_exception(message: str) -> None:
                raise jinja2.TemplateError(message)

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
            )
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled_template = env.from_string(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}", param="messages") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # the template writes BOS itself where the model wants one
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting a broken UTF-8 sequence.

    Stop strings are matched on the decoded text, so they are found across token boundaries; text that
    could still be the start of a stop string is held back until it cannot be.
    """

    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    min_tokens: int = 0  # stop strings do not end the request before this many output tokens exist

    def __post_init__(self) -> None:
        self.text = ""  # everything decoded so far (after a stop string matched: cut before it)
        self._emitted = 0  # characters of self.text already returned
        # the prompt's last _PREFIX_WINDOW tokens (the decoding context of the first output token),
        # then the output, extended in place: the prompt itself is never copied
        self._ids = list(self.prompt_token_ids[-_PREFIX_WINDOW:])
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = self._num_context
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # text before this can be released and is never cut: the text as of the last check less
        # its tail that could begin a stop string. A stop string is only looked for from here, so
        # the output does not depend on whether anyone took the deltas (streaming or not), and
        # a stop string completed while min_tokens held stops off stays text.
        self._safe = 0
        self.stopped_by: str | None = None

    def add_tokens(self, token_ids: list[int], decode: bool = True) -> None:
        """Append generated tokens; sets `stopped_by` when a stop string appears in the text.

        decode=False only records them (offline requests without stop strings decode once, in finish()).
        """
        self._ids.extend(token_ids)
        if not decode:
            return
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence (or nothing printable yet): wait for more tokens
        self.text += new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._check_stop()

    def _decode_window(self) -> tuple[str, str]:
        """(text of the already-read tokens from the prefix offset on, text of those plus the unread)."""
        ids = self._ids
        dec = self.tokenizer.decode
        prefix_text = dec(ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        new_text = dec(ids[self._prefix_offset :], self.skip_special_tokens)
        return prefix_text, new_text

    def _check_stop(self) -> None:
        if not self.stop or self.stopped_by is not None:
            return
        if len(self._ids) - self._num_context >= self.min_tokens:
            best: tuple[int, str] | None = None
            for s in self.stop:
                i = self.text.find(s, self._safe)
                if i != -1 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                self.text = self.text[: best[0]]
                self.stopped_by = best[1]
                return
        self._safe = len(self.text) - self._partial_stop_suffix()

    def finish(self) -> None:
        """Flush tokens still held back waiting for more bytes (the request is over)."""
        if self.stopped_by is None and self._read_offset < len(self._ids):
            prefix_text, new_text = self._decode_window()
            self.text += new_text[len(prefix_text) :]
            self._read_offset = len(self._ids)
            self._check_stop()

    @property
    def released_text(self) -> str:
        return self.text[: self._emitted]

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is the beginning of some stop string.

        Only tails starting at an occurrence of a stop string's first character can match, so the
        scan visits those positions instead of every tail length."""
        tail = self.text[-self._hold :] if self._hold else ""
        best = 0
        for s in self.stop:
            i = tail.find(s[0], max(0, len(tail) - len(s) + 1))
            while i != -1 and len(tail) - i > best:
                if s.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return best

    def take_delta(self, finished: bool) -> str:
        """Text not yet returned; while unfinished, keep back what could begin a stop string."""
        end = len(self.text) if finished or self.stopped_by is not None or not self.stop else self._safe
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
