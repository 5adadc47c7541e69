"""Request body schemas of the OpenAI API as we serve it, and the validator that enforces them.

One source of truth: the server validates every body against these JSON Schemas (OpenAPI 3.0
flavour: `nullable`, boolean `exclusiveMinimum`) and /openapi.json publishes the same dicts, so a
fuzzer that follows the document and the server agree on what is valid.

The validator implements exactly the keywords used here and reports the first violation as
(param path, message), e.g. ("messages[0].role", "..."). Unknown fields are rejected, as OpenAI
does ("Unrecognized request argument supplied"). Torch-free.
"""

from __future__ import annotations

from typing import Any

from .sampling_params import MAX_LOGPROBS
from .sampling_params import MAX_STOP_STRING_LEN as MAX_STOP_LEN
from .sampling_params import MAX_STOP_STRINGS as MAX_STOP

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 32  # prompts in one /v1/completions batch
MAX_CHOICES = 64  # n x prompts
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_STOP_TOKEN_IDS = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")

Schema = dict[str, Any]

# a token id; for_model() narrows the maximum to the served model's vocabulary
_TOKEN_ID: Schema = {"type": "integer", "minimum": 0, "maximum": INT64_MAX, "x-token-id": True}


def _int(lo: int | None = None, hi: int | None = None, **kw: Any) -> Schema:
    s: Schema = {"type": "integer", "nullable": True, **kw}
    if lo is not None:
        s["minimum"] = lo
    if hi is not None:
        s["maximum"] = hi
    return s


def _neutral_number(name: str) -> Schema:
    return {
        "type": "number",
        "nullable": True,
        "minimum": 0,
        "maximum": 0,
        "description": f"not implemented: accepted only at its neutral value 0 ({name})",
    }


_STOP: Schema = {
    "nullable": True,
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
        {
            "type": "array",
            "maxItems": MAX_STOP,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
        },
    ],
    "description": f"up to {MAX_STOP} strings; generation stops before the first one that appears",
}

_STREAM_OPTIONS: Schema = {
    "type": "object",
    "nullable": True,
    "properties": {"include_usage": {"type": "boolean", "nullable": True}},
    "additionalProperties": False,
    "description": "only with stream=true",
}

# fields both endpoints share (OpenAI's, then vLLM's extensions top_k, min_tokens, ignore_eos,
# stop_token_ids)
_COMMON: dict[str, Schema] = {
    "model": {"type": "string", "nullable": True, "description": "the served model name; optional"},
    "max_tokens": _int(1, description="default: whatever context the prompt leaves"),
    "temperature": {"type": "number", "nullable": True, "minimum": 0, "maximum": 2},
    "top_p": {
        "type": "number",
        "nullable": True,
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
    },
    "n": _int(1, MAX_N),
    "seed": _int(INT64_MIN, INT64_MAX),
    "stop": _STOP,
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": _STREAM_OPTIONS,
    "user": {"type": "string", "nullable": True, "description": "ignored"},
    "frequency_penalty": _neutral_number("frequency_penalty"),
    "presence_penalty": _neutral_number("presence_penalty"),
    "logit_bias": {
        "type": "object",
        "nullable": True,
        "maxProperties": 0,
        "description": "not implemented: only null or {}",
    },
    "top_k": _int(-1, description="0 or -1 disables top-k"),
    "min_tokens": _int(0),
    "ignore_eos": {"type": "boolean", "nullable": True},
    "stop_token_ids": {
        "type": "array",
        "nullable": True,
        "maxItems": MAX_STOP_TOKEN_IDS,
        "items": _TOKEN_ID,
    },
}

_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "additionalProperties": False,
}

MESSAGE: Schema = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_CONTENT_PARTS,
                    "items": _TEXT_PART,
                },
            ],
            "description": "a string, or a list of {type: text, text} parts (joined with newlines)",
        },
        "name": {"type": "string", "nullable": True},
    },
    "additionalProperties": False,
}

CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": MESSAGE},
        **_COMMON,
        "max_completion_tokens": _int(1, description="preferred over max_tokens when both are set"),
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": _int(0, MAX_LOGPROBS, description="needs logprobs=true"),
        "response_format": {
            "type": "object",
            "nullable": True,
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text"]}},
            "additionalProperties": False,
            "description": "only {type: text}",
        },
        "tools": {"type": "array", "nullable": True, "maxItems": 0, "description": "no tool support"},
        "tool_choice": {"type": "string", "nullable": True, "enum": ["none", None]},
        "parallel_tool_calls": {"type": "boolean", "nullable": True, "description": "ignored"},
    },
    "additionalProperties": False,
}

_TOKENS: Schema = {"type": "array", "minItems": 1, "items": _TOKEN_ID}

COMPLETION_REQUEST: Schema = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_PROMPTS,
                    "items": {"type": "string", "minLength": 1},
                },
                _TOKENS,
                {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": _TOKENS},
            ],
            "description": "a string, a list of token ids, or a batch of either (up to 32)",
        },
        **_COMMON,
        "logprobs": _int(0, MAX_LOGPROBS, description="number of alternatives per token"),
        "echo": {"type": "boolean", "nullable": True, "enum": [False, None], "description": "only false"},
        "suffix": {"type": "string", "nullable": True, "maxLength": 0, "description": "only null or ''"},
        "best_of": _int(1, 1, description="only 1"),
    },
    "additionalProperties": False,
}


def for_model(schema: Schema, vocab_size: int) -> Schema:
    """A copy of `schema` whose token ids must be below `vocab_size`."""
    if isinstance(schema, dict):
        out = {k: for_model(v, vocab_size) for k, v in schema.items()}
        if out.get("x-token-id"):
            out["maximum"] = vocab_size - 1
        return out
    if isinstance(schema, list):
        return [for_model(v, vocab_size) for v in schema]
    return schema


class SchemaError(ValueError):
    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
}


def _is_type(v: Any, t: str) -> bool:
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "array":
        return isinstance(v, list)
    if t == "object":
        return isinstance(v, dict)
    raise AssertionError(f"schema type {t!r} is not implemented")


def describe(schema: Schema) -> str:
    """A short English name for what the schema accepts (used in error messages)."""
    if "anyOf" in schema:
        return " or ".join(describe(s) for s in schema["anyOf"])
    t = schema.get("type", "any value")
    if t == "array" and "items" in schema:
        items = describe(schema["items"]).removeprefix("a ").removeprefix("an ")
        if items.startswith("array of "):  # already plural inside: "an array of arrays of integers"
            return f"an array of arrays of {items.removeprefix('array of ')}"
        return f"an array of {items}s"
    return _TYPE_NAMES.get(t, t)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(value: Any, schema: Schema, path: str = "") -> None:
    """Raise SchemaError(param, message) at the first violation; `path` names the param."""
    name = path or "the request body"
    if value is None:
        if schema.get("nullable"):
            return
        raise SchemaError(path or None, f"'{name}' must be {describe(schema)}, not null")
    if "anyOf" in schema:
        if not any(_matches(value, s) for s in schema["anyOf"]):
            # a single branch of the right type gives the more precise message
            same_type = [s for s in schema["anyOf"] if _is_type(value, s.get("type", ""))]
            if len(same_type) == 1:
                validate(value, same_type[0], path)
            raise SchemaError(path or None, f"'{name}' must be {describe(schema)}, got {_short(value)}")
        return
    t = schema.get("type")
    if t is not None and not _is_type(value, t):
        raise SchemaError(path or None, f"'{name}' must be {_TYPE_NAMES[t]}, got {_short(value)}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(x) for x in schema["enum"] if x is not None)
        raise SchemaError(path or None, f"'{name}' must be one of {allowed}, got {_short(value)}")
    if t in ("integer", "number"):
        _check_range(value, schema, name, path)
    elif t == "string":
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            raise SchemaError(
                path, f"'{name}' must have {lo or 0} to {hi if hi is not None else 'any'} characters"
            )
    elif t == "array":
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        if lo is not None and len(value) < lo:
            raise SchemaError(path, f"'{name}' must have at least {lo} item(s)")
        if hi is not None and len(value) > hi:
            raise SchemaError(path, f"'{name}' must have at most {hi} items, got {len(value)}")
        items = schema.get("items")
        if items is not None:
            for i, v in enumerate(value):
                validate(v, items, _join(path, i))
    elif t == "object":
        _validate_object(value, schema, path, name)


def _check_range(value: float, schema: Schema, name: str, path: str) -> None:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    excl = schema.get("exclusiveMinimum") is True
    if (lo is not None and (value < lo or (excl and value == lo))) or (hi is not None and value > hi):
        left = "(" if excl else "["
        span = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise SchemaError(path, f"'{name}' must be in {span}, got {_short(value)}")


def _validate_object(value: dict[str, Any], schema: Schema, path: str, name: str) -> None:
    # known fields first, so that {"type": "image_url", ...} is reported at `type`
    props: dict[str, Schema] = schema.get("properties", {})
    for k, v in value.items():
        if k in props:
            validate(v, props[k], _join(path, k))
    for k in schema.get("required", []):
        if k not in value:
            raise SchemaError(_join(path, k), f"'{_join(path, k)}' is a required property")
    if schema.get("additionalProperties") is False:
        for k in value:
            if k not in props:
                raise SchemaError(_join(path, k), f"Unrecognized request argument supplied: {k}")
    hi = schema.get("maxProperties")
    if hi is not None and len(value) > hi:
        raise SchemaError(path or None, f"'{name}' is not supported (only null or an empty object)")


def _matches(value: Any, schema: Schema) -> bool:
    try:
        validate(value, schema)
    except SchemaError:
        return False
    return True
