"""Checkpoint loading: safetensors shards (with or without the index file) into the model.

The files are memory-mapped and parsed here (8-byte header length, JSON header, raw data), so a
tensor is a view of the page cache with no intermediate CPU copy. On CUDA, a pool of threads
copies each tensor in chunks from the mapping into pinned staging buffers and from there to the
GPU on per-thread streams, so disk or page-cache reads, host copies and PCIe transfers overlap;
the model then copies device to device into its (merged) parameters.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import queue
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


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


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """A memory-mapped safetensors file. Tensors are views of the mapping (copy-on-write, so
    torch accepts them as writable; nothing is written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > size - 8:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(f.read(hlen))
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from None
        base = 8 + hlen
        self.entries: list[TensorEntry] = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dt = _DTYPES.get(meta.get("dtype"))
                b, e = (int(x) for x in meta["data_offsets"])
                shape = tuple(int(x) for x in meta["shape"])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise ModelLoadError(f"{path.name}: malformed header entry for tensor {name!r}") from None
            if dt is None:
                raise ModelLoadError(
                    f"{path.name}: tensor {name} has unsupported dtype {meta.get('dtype')!r}"
                )
            if not (0 <= b <= e <= size - base):
                raise ModelLoadError(f"{path.name}: tensor {name} lies outside the file")
            if math.prod(shape) * dt.itemsize != e - b:
                raise ModelLoadError(f"{path.name}: tensor {name}: {e - b} bytes do not match shape {shape}")
            self.entries.append(TensorEntry(name, dt, shape, base + b, e - b))
        self.entries.sort(key=lambda t: t.start)  # read in file order

    def view(self, t: TensorEntry) -> torch.Tensor:
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        return self.raw(t).view(t.dtype).view(t.shape)

    def raw(self, t: TensorEntry) -> torch.Tensor:
        return torch.frombuffer(self._mmap, dtype=torch.uint8, count=t.nbytes, offset=t.start)


# FP8 tensors are never converted: without their scales the values mean nothing in another dtype
_KEEP_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _convert(
    name: str, x: torch.Tensor, dtype: torch.dtype, keep: Callable[[str], bool] | None
) -> torch.Tensor:
    convert = x.is_floating_point() and x.dtype != dtype and x.dtype not in _KEEP_DTYPES
    return x.to(dtype) if convert and not (keep is not None and keep(name)) else x


def iter_weights(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    keep_dtype: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor; floating tensors converted to `dtype`, except FP8 ones
    and those `keep_dtype(name)` names (quantization scales). On CUDA the tensors arrive on the device
    through the pinned pipeline."""
    device = torch.device(device)
    files = [SafetensorsFile(p) for p in safetensors_files(model_dir)]
    if device.type == "cuda":
        yield from _CudaPipeline(files, device).run(dtype, keep_dtype)
        return
    for f in files:
        for t in f.entries:
            yield t.name, _convert(t.name, f.view(t), dtype, keep_dtype)


class _CudaPipeline:
    """Chunks of every tensor flow mmap -> pinned buffer -> GPU on a pool of threads.

    Each thread owns one pinned buffer and one stream; a chunk is a memcpy (GIL released) followed
    by an async H2D copy and a stream sync before the buffer is reused. Tensors are yielded in file
    order as soon as all their chunks have landed.
    """

    CHUNK = 64 * 2**20

    def __init__(self, files: list[SafetensorsFile], device: torch.device, threads: int = 8) -> None:
        self.files = files
        self.device = device
        self.threads = threads
        self._local = threading.local()
        self._buffers: queue.SimpleQueue[tuple[torch.Tensor, torch.cuda.Stream]] = queue.SimpleQueue()
        for _ in range(threads):
            self._buffers.put(
                (torch.empty(self.CHUNK, dtype=torch.uint8).pin_memory(), torch.cuda.Stream(device))
            )

    def _copy_chunk(self, src: torch.Tensor, dst: torch.Tensor, ready: torch.cuda.Event) -> None:
        buf, stream = self._buffers.get()
        try:
            n = src.numel()
            buf[:n].copy_(src)
            # `dst` came from the caching allocator on the main stream, possibly reusing memory that
            # queued work there still reads: write it only after that work
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                dst.copy_(buf[:n], non_blocking=True)
            stream.synchronize()
        finally:
            self._buffers.put((buf, stream))

    def run(
        self, dtype: torch.dtype, keep_dtype: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        t0 = time.perf_counter()
        total = 0
        with ThreadPoolExecutor(self.threads, thread_name_prefix="weights") as pool:
            pending: deque[tuple[TensorEntry, torch.Tensor, list[Future[None]]]] = deque()
            inflight = 0
            limit = 4 * self.threads * self.CHUNK  # bytes of GPU staging tensors allocated ahead
            entries = [(f, t) for f in self.files for t in f.entries]
            i = 0
            while i < len(entries) or pending:
                while i < len(entries) and (inflight < limit or not pending):
                    f, t = entries[i]
                    gpu = torch.empty(t.nbytes, dtype=torch.uint8, device=self.device)
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(self.device))
                    src = f.raw(t)
                    futs = [
                        pool.submit(self._copy_chunk, src[o : o + self.CHUNK], gpu[o : o + self.CHUNK], ready)
                        for o in range(0, t.nbytes, self.CHUNK)
                    ]
                    pending.append((t, gpu, futs))
                    inflight += t.nbytes
                    i += 1
                t, gpu, futs = pending.popleft()
                for fu in futs:
                    fu.result()
                inflight -= t.nbytes
                total += t.nbytes
                x = (
                    gpu.view(t.dtype).view(t.shape)
                    if t.nbytes
                    else torch.empty(t.shape, dtype=t.dtype, device=self.device)
                )
                yield t.name, _convert(t.name, x, dtype, keep_dtype)
        dt = time.perf_counter() - t0
        log.info("read %.2f GB of weights in %.2fs (%.2f GB/s)", total / 1e9, dt, total / 1e9 / max(dt, 1e-9))


def load_model_weights(model: torch.nn.Module, model_dir: str | Path, dtype: torch.dtype) -> float:
    """Load every tensor into `model` (which lives on its target device). Returns seconds taken."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    keep = getattr(model, "keep_checkpoint_dtype", None)
    model.load_weights(iter_weights(model_dir, dtype, device, keep))  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
