"""CUDA graphs for decode steps: one graph per batch size of a ladder, inputs padded up.

A decode step's kernels take every varying quantity (tokens, positions, cache slots, context
lengths, block tables) from device buffers, and its grid sizes depend only on the batch size, so
one capture per padded batch size serves every later step. Padding rows have slot -1 (the cache
write skips them) and context length 0 (attention writes zeros), so they never touch real state.
The logits projection is captured too; sampling runs after the replay.

Between two replays the engine's stream carries one kernel: DecoderModel.embed's launch, which
takes each row's token id (from the previous step's sampled ids, still on the device, where the
row's input is a placeholder), writes the embedding and the first layer's normalized input where
the graph reads them, and moves the step's inputs (packed per-row fields, block-table rows) from
a device staging set into the graph's buffers. The staging sets (two, used in turn) are filled
from pinned host memory on a side stream while the previous step still runs: copy-engine
transfers on the engine's stream left the GPU idle ~5 us around each (H100 profile,
docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .kernels.elementwise import StagedInputs
from .layers.attention import AttentionMetadata
from .models import DecoderModel
from .runner import Feed, feed_rows

log = logging.getLogger(__name__)


def batch_size_ladder(max_bs: int) -> list[int]:
    """1, 2, 4, 8, every 8 up to 64, then every 32: 17 graphs up to 256.

    Above 64 rows a decode step streams the weights through cuBLAS GEMMs that cost about the same
    for 129 or 160 rows (memory-bound), and padding rows read no KV (context 0), so the coarser
    steps lose little while capture time (and Triton compilation on a new pod) shrinks.
    """
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs]
    b = 16
    while b <= max_bs:
        sizes.append(b)
        b += 8 if b < 64 else 32
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def decode_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Context splits so that a small decode batch still puts ~2 programs on every SM."""
    programs = batch * num_kv_heads
    want = min(16, max(1, -(-2 * num_sms // programs)))
    return 1 << (want.bit_length() - 1)  # a power of two (the merge kernel's arange needs one)


# DecodeGraphs' per-row step inputs, in this order: (name, dtype) of max_batch entries each
_FIELDS = (
    ("input_ids", torch.int64),
    ("positions", torch.int64),
    ("slots", torch.int64),
    ("feed_rows", torch.int64),  # the previous step's row whose sampled id is this row's input, or -1
    ("seq_lens", torch.int32),
)
_STEP_BYTES_PER_ROW = sum(dt.itemsize for _, dt in _FIELDS)


def _fields(buf: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a byte buffer laid out as _FIELDS (every field starts 8-byte aligned: the
    int32 field comes last)."""
    views, at = [], 0
    for _, dt in _FIELDS:
        views.append(buf[at : at + n * dt.itemsize].view(dt))
        at += n * dt.itemsize
    return tuple(views)


class DecodeGraphs:
    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        num_sms: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        cfg = model.config
        self.num_sms = num_sms  # the device's multiprocessor count (decode_splits)
        n = self.max_batch
        # the buffers the graphs read: a step's per-row inputs in one byte buffer laid out as
        # _FIELDS (four int64 fields, then the int32 context lengths, max_batch entries each), the
        # block tables, and the embedding's outputs (residual stream, first layer's input)
        self._inputs = torch.zeros(_STEP_BYTES_PER_ROW * n, dtype=torch.uint8, device=device)
        self.input_ids, self.positions, self.slots, self.feed_rows, self.seq_lens = _fields(self._inputs, n)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.slots.fill_(-1)  # padding rows write no KV (capture runs the graphs once)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        emb = model.model.embed_tokens.weight
        self.residual = torch.zeros((n, cfg.hidden_size), dtype=emb.dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        max_splits = decode_splits(1, cfg.num_kv_heads, self.num_sms)
        self.workspace = (
            torch.empty((max_splits, n, cfg.num_heads, cfg.head_dim), dtype=torch.float32, device=device),
            torch.empty((2, max_splits, n, cfg.num_heads), dtype=torch.float32, device=device),
        )
        # two staging sets, used in turn: pinned host buffers the step is written into, device
        # copies filled on the side stream, and two events: `copied` (the set's host->device copies
        # are done: its pinned memory may be rewritten, its device copy read) and `consumed` (the
        # launch that read its device copy has run: the copy may be refilled)
        self._copy_in = torch.cuda.Stream(device)
        self._staging = []
        for _ in range(2):
            h_inputs = torch.zeros(_STEP_BYTES_PER_ROW * n, dtype=torch.uint8).pin_memory()
            h_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32).pin_memory()
            views = tuple(t.numpy() for t in _fields(h_inputs, n))  # numpy views of the pinned bytes
            d_inputs = torch.zeros_like(self._inputs)
            d_tables = torch.zeros_like(self.block_tables)
            d_ids, _, _, d_feed, _ = _fields(d_inputs, n)
            self._staging.append(
                (h_inputs, h_tables, views, h_tables.numpy(), d_inputs, d_tables, d_ids, d_feed,
                 torch.cuda.Event(), torch.cuda.Event())
            )  # fmt: skip
        self._flip = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def _meta(self, bs: int) -> AttentionMetadata:
        splits = decode_splits(bs, self.model.config.num_kv_heads, self.num_sms)
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            query_lens_host=[],
            seq_lens_host=[],
            num_splits=splits,
            split_workspace=self._split_ws(splits, bs),
        )

    def _split_ws(self, splits: int, bs: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if splits == 1:
            return None
        cfg = self.model.config
        # contiguous views carved out of the flat workspace, laid out as the kernel expects
        part = self.workspace[0].view(-1)[: splits * bs * cfg.num_heads * cfg.head_dim]
        ml = self.workspace[1].view(-1)[: 2 * splits * bs * cfg.num_heads]
        return (
            part.view(splits, bs, cfg.num_heads, cfg.head_dim),
            ml.view(2, splits, bs, cfg.num_heads),
        )

    def _forward(self, bs: int) -> torch.Tensor:
        embedded = (self.residual[:bs], self.hidden[:bs])
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs), embedded=embedded
        )
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(bs)  # warm-up: Triton compilation, cuBLAS handles and workspaces
            torch.cuda.current_stream(self.device).wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                logits = self._forward(bs)
            self.graphs[bs] = (g, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.2fs",
            len(self.graphs),
            self.max_batch,
            self.capture_seconds,
        )
        return self.capture_seconds

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        tables: list[np.ndarray],
        feed: Feed | None = None,
    ) -> torch.Tensor:
        """Replay the smallest graph that holds len(ids) rows; returns logits [n, V] (a view)."""
        n = len(ids)
        bs = next(b for b in self.sizes if b >= n)
        h_inputs, h_tables, views, ht, d_inputs, d_tables, d_ids, d_feed, copied, consumed = self._staging[
            self._flip
        ]
        self._flip ^= 1
        copied.synchronize()  # this set's last copies (two steps ago) have left its pinned memory
        h_ids, h_pos, h_slots, h_feed, h_lens = views
        h_ids[:n], h_pos[:n], h_slots[:n], h_lens[:n] = ids, positions, slots, seq_lens
        h_ids[n:bs], h_pos[n:bs], h_slots[n:bs], h_lens[n:bs] = 0, 0, -1, 0
        h_feed[:bs] = -1
        if feed is not None:
            h_feed[:n] = feed_rows(feed, n)
        width = max(len(t) for t in tables)
        for i, t in enumerate(tables):
            ht[i, : len(t)] = t
        side = self._copy_in
        side.wait_event(consumed)  # the launch that last read this set's device copy has run
        with torch.cuda.stream(side):
            d_inputs.copy_(h_inputs, non_blocking=True)
            d_tables[:n, :width].copy_(h_tables[:n, :width], non_blocking=True)
            copied.record(side)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(copied)
        staged = StagedInputs(
            d_inputs.view(torch.int32), self._inputs.view(torch.int32), d_tables, self.block_tables, width
        )
        fed = (d_feed[:bs], feed[2]) if feed is not None else None
        self.model.embed(d_ids[:bs], fed, out=(self.residual[:bs], self.hidden[:bs]), staged=staged)
        consumed.record(stream)
        g, logits = self.graphs[bs]
        g.replay()
        return logits[:n]
