"""The OpenAPI 3.0 document served at /openapi.json, built from the same schemas the server
enforces (schemas.py), so clients, fuzzers and the server agree on what a valid request is."""

from __future__ import annotations

from typing import Any

from .schemas import CHAT_REQUEST, COMPLETION_REQUEST

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}


def _response(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [obj]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": {**_USAGE, "nullable": True},
        },
    }


_CHAT_RESPONSE = _response(
    "chat.completion",
    {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
            "logprobs": {"type": "object", "nullable": True},
            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
        },
    },
)
_COMPLETION_RESPONSE = _response(
    "text_completion",
    {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "text": {"type": "string"},
            "logprobs": {"type": "object", "nullable": True},
            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
        },
    },
)


def _public(schema: Any) -> Any:
    """A deep copy without our private markers (x-token-id)."""
    if isinstance(schema, dict):
        return {k: _public(v) for k, v in schema.items() if k != "x-token-id"}
    if isinstance(schema, list):
        return [_public(v) for v in schema]
    return schema


def _err(description: str, retry_after: bool = False) -> dict[str, Any]:
    r: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        r["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    return r


_GEN_ERRORS = {
    "400": _err("invalid request; `param` names the field"),
    "401": _err("missing or wrong API key (only when the server has one)"),
    "404": _err("unknown model"),
    "413": _err("request body too large"),
    "415": _err("Content-Type is not application/json"),
    "429": _err("request queue full", retry_after=True),
    "503": _err("loading, warming up, draining or dead", retry_after=True),
}


def _generate_op(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{}, {"bearerAuth": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
            },
            "responses": {
                "200": {
                    "description": "the completion, or with stream=true server-sent events "
                    "(`data: {chunk}` ... `data: [DONE]`; an error after the start is `event: error`)",
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_GEN_ERRORS,
            },
        }
    }


def _models_op(summary: str, by_name: bool = False) -> dict[str, Any]:
    """GET /v1/models, or with `by_name` GET /v1/models/{model}."""
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{}, {"bearerAuth": []}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "401": _GEN_ERRORS["401"],
            **({"404": _GEN_ERRORS["404"]} if by_name else {}),
            "503": _GEN_ERRORS["503"],
        },
    }
    if by_name:
        op["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {"get": op}


def _get_op(summary: str, content_type: str, responses: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {content_type: {"schema": {}}}},
                **(responses or {}),
            },
        }
    }


def openapi_document(
    model_name: str,
    chat_request: dict[str, Any] = CHAT_REQUEST,
    completion_request: dict[str, Any] = COMPLETION_REQUEST,
) -> dict[str, Any]:
    """The document for one served model (its request schemas know its vocabulary)."""
    phase = {
        "description": "not ready: {phase: loading | warming_up | draining | dead}",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "inferfleet worker",
            "version": "1",
            "description": f"OpenAI-compatible API serving the model '{model_name}'.",
        },
        "paths": {
            "/v1/chat/completions": _generate_op(
                "Chat completion", "ChatCompletionRequest", "ChatCompletion"
            ),
            "/v1/completions": _generate_op("Text completion", "CompletionRequest", "Completion"),
            "/v1/models": _models_op("The served model"),
            "/v1/models/{model}": _models_op(
                "The served model by its name; 404 (model_not_found) for any other", by_name=True
            ),
            "/health/live": _get_op(
                "200 while loading or serving; 503 once the engine is dead",
                "application/json",
                {"503": phase},
            ),
            "/health/ready": _get_op(
                "200 only when loaded, warmed up and not draining", "application/json", {"503": phase}
            ),
            "/metrics": _get_op("Prometheus metrics", "text/plain"),
            "/openapi.json": _get_op("This document", "application/json"),
        },
        "components": {
            "schemas": {
                "ChatCompletionRequest": _public(chat_request),
                "CompletionRequest": _public(completion_request),
                "ChatCompletion": _CHAT_RESPONSE,
                "Completion": _COMPLETION_RESPONSE,
                "Error": _ERROR,
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
