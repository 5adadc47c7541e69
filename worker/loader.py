"""Checkpoint loading: safetensors shards (with or without the index file) into the model."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards named in {index.name} are missing: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {d}")
    return files


def iter_weights(model_dir: str | Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor, converted to `dtype` (floating tensors only)."""
    from safetensors import safe_open

    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    t = sf.get_tensor(name)
                    if t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    yield name, t
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None


def load_model_weights(model: torch.nn.Module, model_dir: str | Path, dtype: torch.dtype) -> float:
    """Load every tensor into `model` (which lives on its target device). Returns seconds taken."""
    t0 = time.perf_counter()
    model.load_weights(iter_weights(model_dir, dtype))  # type: ignore[operator]
    return time.perf_counter() - t0
