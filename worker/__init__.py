"""inferfleet's inference worker: paged KV cache, continuous batching, OpenAI-compatible server.

Heavy modules (torch) load lazily, so `import inferfleet.worker.protocol`-style torch-free modules
stay usable from the operator image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine import LLMEngine
    from .llm import LLM
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams

_LAZY = {
    "LLM": ".llm",
    "EngineConfig": ".config",
    "LLMEngine": ".engine",
    "RequestOutput": ".outputs",
    "SamplingParams": ".sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
