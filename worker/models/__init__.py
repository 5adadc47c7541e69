"""Model implementations. One decoder serves every supported family through config switches."""

from .llama import DecoderModel

__all__ = ["DecoderModel"]
