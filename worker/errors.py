"""Typed errors. Bad input raises one of these (mapped to a 4xx by the server); invariants use assert."""

from __future__ import annotations


class InferfleetError(Exception):
    """Base class for every error the worker raises on purpose."""


class InvalidRequestError(InferfleetError, ValueError):
    """A request (or an argument of the Python API) is invalid. `param` names the offending field.

    `code` follows OpenAI's convention: a short string id such as "context_length_exceeded", or None.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class UnsupportedModelError(InferfleetError, ValueError):
    """The checkpoint uses an architecture or a setting the engine does not implement."""


class ModelLoadError(InferfleetError, RuntimeError):
    """The checkpoint is missing files or tensors, or their shapes do not match config.json."""


class EngineDeadError(InferfleetError, RuntimeError):
    """The engine's step loop failed; no request can be served any more."""
