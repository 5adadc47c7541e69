"""The OpenAI wire format, inbound: parse and check request bodies; the error object.

Everything here is pure (no aiohttp, no torch): bodies in, typed requests or `ApiError` out.
responses.py builds what goes back. The server decides when; these modules decide what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError
from .sampling_params import SamplingParams
from .schemas import CHAT_REQUEST, COMPLETION_REQUEST, MAX_CHOICES, SchemaError, validate


class ApiError(Exception):
    """An error that becomes an OpenAI error object `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def from_invalid(cls, e: InvalidRequestError) -> ApiError:
        return cls(400, e.message, param=e.param, code=e.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(name: str) -> ApiError:
    """The 404 for a request naming a model this server does not serve."""
    return ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, or a 400 (param null) saying what is wrong with the bytes."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
        # Python's json accepts NaN and Infinity; JSON does not
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    bad = _unencodable(body, "")
    if bad is not None:
        # a lone surrogate escape (\ud800) is valid JSON but no text: the tokenizer cannot take it
        raise bad_request(f"'{bad}' holds an unpaired UTF-16 surrogate", param=bad or None)
    return body


def _unencodable(v: Any, path: str) -> str | None:
    """The path of the first string that is not valid Unicode text, or None."""
    if isinstance(v, str):
        if v.isascii():
            return None
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(v, dict):
        items: Any = ((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
    elif isinstance(v, list):
        items = ((f"{path}[{i}]", x) for i, x in enumerate(v))
    else:
        return None
    for p, x in items:
        found = _unencodable(x, p)
        if found is not None:
            return found
    return None


# -- requests ------------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    """The sampling fields of a request, checked; max_tokens may wait for the prompt's length."""

    max_tokens: int | None
    max_tokens_param: str  # which field the user set ("max_tokens" or "max_completion_tokens")
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per token; None: no logprobs

    def params(self, max_tokens: int, index: int = 0) -> SamplingParams:
        """Engine params for choice `index`: distinct choices draw from distinct seeds.

        Raises InvalidRequestError; its param says "max_tokens" even when the user set
        max_completion_tokens (the caller renames it, see serving.OpenAIServing._plan)."""
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            seed=seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            min_tokens=self.min_tokens,
        )


@dataclass
class GenerateRequest:
    """What both endpoints boil down to: prompts (text, token ids or chat messages) x n choices."""

    kind: str  # "chat" | "completion"
    model: str | None
    n: int
    stream: bool
    include_usage: bool
    sampling: SamplingOptions
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict[str, str]] = field(default_factory=list)  # chat, contents joined

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) if self.kind == "completion" else 1

    @property
    def num_choices(self) -> int:
        return self.num_prompts * self.n

    def estimated_prompt_tokens(self) -> list[int]:
        """A cheap guess per prompt, for admission before tokenizing (corrected right after)."""
        if self.kind == "chat":
            chars = sum(len(m["content"]) + 8 for m in self.messages)
            return [chars // 4 + 1]
        return [len(p) if isinstance(p, list) else len(p) // 4 + 1 for p in self.prompts]


def _get(body: dict[str, Any], key: str, default: Any) -> Any:
    v = body.get(key)
    return default if v is None else v


def _sampling(body: dict[str, Any], kind: str) -> SamplingOptions:
    max_tokens, param = body.get("max_tokens"), "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens, param = body["max_completion_tokens"], "max_completion_tokens"
    stop = _get(body, "stop", [])
    opts = SamplingOptions(
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=_get(body, "temperature", 1.0),
        top_p=_get(body, "top_p", 1.0),
        top_k=_get(body, "top_k", 0),
        min_tokens=_get(body, "min_tokens", 0),
        seed=None if body.get("seed") is None else body["seed"] % 2**63,
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(_get(body, "stop_token_ids", [])),
        ignore_eos=_get(body, "ignore_eos", False),
    )
    if opts.max_tokens is not None and opts.min_tokens > opts.max_tokens:
        raise bad_request(f"min_tokens ({opts.min_tokens}) must not exceed {param}", param="min_tokens")
    return opts


def _common(body: dict[str, Any], schema: dict[str, Any], kind: str) -> GenerateRequest:
    try:
        validate(body, schema)
    except SchemaError as e:
        raise bad_request(e.message, param=e.param) from None
    stream = bool(_get(body, "stream", False))
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    return GenerateRequest(
        kind=kind,
        model=body.get("model"),
        n=_get(body, "n", 1),
        stream=stream,
        include_usage=bool(opts and opts.get("include_usage")),
        sampling=_sampling(body, kind),
    )


def parse_chat(body: dict[str, Any], schema: dict[str, Any] = CHAT_REQUEST) -> GenerateRequest:
    req = _common(body, schema, "chat")
    for m in body["messages"]:
        c = m["content"]
        content = c if isinstance(c, str) else "\n".join(part["text"] for part in c)
        # "developer" is OpenAI's newer name for the system role; templates know "system"
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": content}
        if m.get("name") is not None:  # a participant's name: templates that know it render it
            msg["name"] = m["name"]
        req.messages.append(msg)
    top = body.get("top_logprobs")
    if body.get("logprobs"):  # chat: logprobs=true -> top_logprobs alternatives (0 if not given)
        req.sampling.logprobs = top or 0
    elif top is not None:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    return req


def parse_completion(body: dict[str, Any], schema: dict[str, Any] = COMPLETION_REQUEST) -> GenerateRequest:
    req = _common(body, schema, "completion")
    p = body["prompt"]
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        req.prompts = [p]
    else:
        req.prompts = list(p)
    req.sampling.logprobs = body.get("logprobs")
    if req.num_choices > MAX_CHOICES:
        raise bad_request(
            f"n x the number of prompts must be at most {MAX_CHOICES}, got {req.num_choices}", param="n"
        )
    return req
