"""CUDA graphs for decode steps: one graph per batch size of a ladder, inputs padded up.

A decode step's kernels take every varying quantity (tokens, positions, cache slots, context
lengths, block tables) from device buffers, and its grid sizes depend only on the batch size, so
one capture per padded batch size serves every later step. Padding rows have slot -1 (the cache
write skips them) and context length 0 (attention writes zeros), so they never touch real state.
The logits projection is captured too; sampling runs after the replay.

A step's inputs are staged through two sets used in turn: pinned host buffers, copied on a side
stream into a device copy while the previous step still runs (copy-engine transfers on the
engine's stream left the GPU idle ~5 us around each: H100 profile, docs/benchmarks.md). Above
one row, one kernel runs between two replays: DecoderModel.embed's launch, which moves the staged
inputs into the graph's buffers, takes each fed row's token id from the previous step's sampled
ids (still on the device), and writes the embedding and the first layer's normalized input where
the graph reads them. One row has a graph per staging set that does all of that itself and ends
with the row's greedy token in a fixed buffer (`tokens`): between two greedy one-row replays the
engine's stream runs nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .kernels.elementwise import ARGMAX_KEY_MIN, StagedInputs, argmax_finish, argmax_rows
from .kernels.paged_attention import decode_tiles, fill_tile_map, tile_map_entries
from .layers.attention import AttentionMetadata, table_width
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


def projection_rows(max_seqs: int, max_tokens: int | None, above: int) -> tuple[list[int], list[int]]:
    """The row counts above `above` at which the graphs run the model's projections: every decode
    batch size of the ladder and, where `max_tokens` is given (mixed graphs on), every MixedGraphs
    step size up to it; and those of the lm_head, which sees decode batches only (a mixed step's
    logits are computed outside its graph, for the sampled rows). Sorted: (projections, lm_head)."""
    decode = [b for b in batch_size_ladder(max_seqs) if b > above]
    mixed = [t for t in mixed_sizes(max_tokens) if t > above] if max_tokens is not None else []
    return sorted({*decode, *mixed}), decode


def capture_graph(
    fn: Callable[[], Any], pool: Any, stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """fn() run once on `stream` (warm-up: Triton compilation, cuBLAS handles and workspaces), then
    captured into a graph drawing on `pool`: (the graph, fn's output as captured)."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()
    current.wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, stream=stream):
        out = fn()
    return g, out


# a decode batch whose longest context spans at most this many key tiles takes this many context
# splits where it would take more (decode_splits)
SHORT_CONTEXT_SPLITS = 8


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_tiles: int | None = None) -> int:
    """Context splits so that a small decode batch still puts ~2 programs on every SM. Where the
    longest context spans at most SHORT_CONTEXT_SPLITS key tiles (`max_tiles`: the attention
    kernel's decode tiles, kernels/paged_attention.decode_tiles), that many instead of more:
    every split still holds one tile at most, and the programs with no keys and the partials the
    merge reads halve (H100 W3, FP8 with an FP8 lm_head, 128 + 256 tokens: 3.019-3.020 ms with 16
    splits, 2.997-3.001 with 8, 3.047 with 4, whose splits hold two tiles; docs/benchmarks.md,
    twelfth session)."""
    programs = batch * num_kv_heads
    want = min(16, max(1, -(-2 * num_sms // programs)))
    splits = 1 << (want.bit_length() - 1)  # a power of two (the merge kernel's arange needs one)
    if max_tiles is not None and max_tiles <= SHORT_CONTEXT_SPLITS < splits:
        return SHORT_CONTEXT_SPLITS
    return splits


def split_levels(batch: int, num_kv_heads: int, num_sms: int) -> list[int]:
    """Every split count decode_splits gives a batch of this size, whatever its contexts: one decode
    graph is captured per count."""
    return sorted({decode_splits(batch, num_kv_heads, num_sms, t) for t in (None, 1)})


# DecodeGraphs' per-row step inputs, in this order: (name, dtype) of max_batch entries each
_FIELDS = (
    ("input_ids", torch.int64),
    ("positions", torch.int64),
    ("slots", torch.int64),
    ("feed_rows", torch.int64),  # the previous step's row whose sampled id is this row's input, or -1
    ("seq_lens", torch.int32),
)


def _span(n: int, dt: torch.dtype) -> int:
    """Bytes a field of n entries takes, rounded up to 16 (every field starts 16-byte aligned, as
    Triton assumes of the pointers it compiled for: an odd max_batch would otherwise compile other
    variants of the kernels that read them while serving)."""
    return -(-n * dt.itemsize // 16) * 16


def _carved_bytes(fields: list[tuple[torch.dtype, int]]) -> int:
    """Bytes of a buffer that _carve cuts into `fields` (dtype, entries)."""
    return sum(_span(n, dt) for dt, n in fields)


def _step_fields(n: int) -> list[tuple[torch.dtype, int]]:
    """_FIELDS with n entries each, as _carve takes them."""
    return [(dt, n) for _, dt in _FIELDS]


def _step_bytes(n: int) -> int:
    return _carved_bytes(_step_fields(n))


def _carve(buf: torch.Tensor, fields: list[tuple[torch.dtype, int]]) -> tuple[torch.Tensor, ...]:
    """Typed views of a byte buffer holding `fields` (dtype, entries) one after another, each
    16-byte aligned (_span)."""
    views, at = [], 0
    for dt, n in fields:
        views.append(buf[at : at + n * dt.itemsize].view(dt))
        at += _span(n, dt)
    return tuple(views)


def _fields(buf: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a byte buffer laid out as _FIELDS, n entries each."""
    return _carve(buf, _step_fields(n))


def pack_tables(tables: list[np.ndarray], out: np.ndarray) -> int:
    """Write a step's block-table rows into `out` (flat int32, pinned staging) one after another at
    a common row stride, the longest row's length padded by table_width (the kernels that read them
    compile for strides of 16); returns that stride. The step then copies only rows x stride
    entries to the device, not whole rows of the engine's widest table (max_model_len / page: 8 MB
    for 256 rows at 131,072 tokens), and a kernel spreads them into the graph's table. Entries past
    a row's length keep what they held: attention reads only the pages its context covers."""
    w = table_width(max(len(t) for t in tables))
    assert len(tables) * w <= len(out), f"{len(tables)} rows of {w} entries, staging holds {len(out)}"
    for i, t in enumerate(tables):
        out[i * w : i * w + len(t)] = t
    return w


class _Inputs:
    """A decode step's inputs on the device: the per-row fields in one byte buffer laid out as
    _FIELDS (four int64 fields, then the int32 context lengths, `rows` entries each; _fields) and
    the block tables."""

    def __init__(self, rows: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.bytes = torch.zeros(_step_bytes(rows), dtype=torch.uint8, device=device)
        self.words = self.bytes.view(torch.int32)  # what embed's staged copy moves
        self.ids, self.positions, self.slots, self.feed_rows, self.seq_lens = _fields(self.bytes, rows)
        self.slots.fill_(-1)  # padding rows write no KV (capture runs each graph once)
        self.tables = torch.zeros((rows, max_blocks_per_seq), dtype=torch.int32, device=device)


class _Staging:
    """One of the two staging sets used in turn: pinned host buffers a step is written into, their
    device copy (filled on the side stream), and two events: `copied` (the host->device copies are
    done: the pinned memory may be rewritten, the device copy read) and `consumed` (what read the
    device copy has run: it may be refilled)."""

    def __init__(self, rows: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.h_bytes = torch.zeros(_step_bytes(rows), dtype=torch.uint8).pin_memory()
        self.h_tables = torch.zeros((rows, max_blocks_per_seq), dtype=torch.int32).pin_memory()
        self.views = tuple(t.numpy() for t in _fields(self.h_bytes, rows))  # numpy views, pinned bytes
        self.tables_np = self.h_tables.view(-1).numpy()  # flat: rows packed by pack_tables
        self.dev = _Inputs(rows, max_blocks_per_seq, device)
        self.copied = torch.cuda.Event()
        self.consumed = torch.cuda.Event()


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
        max_blocks_per_seq = table_width(max_blocks_per_seq)  # the tables' row stride, padded
        self.device = device
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        cfg = model.config
        self.num_sms = num_sms  # the device's multiprocessor count (decode_splits)
        n = self.max_batch
        # what the graphs above one row read: the step's inputs and the embedding's outputs
        # (residual stream, first layer's input), written by the launch before the replay
        self.inputs = _Inputs(n, max_blocks_per_seq, device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        emb = model.model.embed_tokens.weight
        self.residual = torch.zeros((n, cfg.hidden_size), dtype=emb.dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        max_splits = decode_splits(1, cfg.num_kv_heads, self.num_sms)
        self.cache_dtype = kv_caches[0][0].dtype  # decode_tiles' tile size
        self.workspace = (
            torch.empty((max_splits, n, cfg.num_heads, cfg.head_dim), dtype=torch.float32, device=device),
            torch.empty((2, max_splits, n, cfg.num_heads), dtype=torch.float32, device=device),
        )
        self._copy_in = torch.cuda.Stream(device)
        self._staging = [_Staging(n, max_blocks_per_seq, device) for _ in range(2)]
        self._flip = 0
        # one-row steps: a graph per staging set, which reads that set's device copy itself and
        # writes the row's greedy token into tokens[set] (its feed comes from tokens[other set])
        self.tokens = torch.zeros((2, n + n % 2), dtype=torch.int64, device=device)  # rows 16-byte aligned
        self._best = torch.full((1,), ARGMAX_KEY_MIN, dtype=torch.int64, device=device)
        # graphs by (rows, context splits): a batch size takes one per split count (split_levels),
        # one rows by staging set too: (1, splits) -> [set 0's, set 1's]
        self.one_row: dict[int, list[tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def _levels(self, bs: int) -> list[int]:
        return split_levels(bs, self.model.config.num_kv_heads, self.num_sms)

    def _meta(self, bs: int, inputs: _Inputs, splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=inputs.slots[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=inputs.seq_lens[:bs],
            block_tables=inputs.tables[:bs],
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

    def _forward(self, bs: int, splits: int) -> torch.Tensor:
        embedded = (self.residual[:bs], self.hidden[:bs])
        inp = self.inputs
        meta = self._meta(bs, inp, splits)
        hidden = self.model(inp.ids[:bs], inp.positions[:bs], self.kv_caches, meta, embedded=embedded)
        return self.model.compute_logits(hidden)

    def _forward_one_row(self, f: int, splits: int) -> torch.Tensor:
        """A one-row step from staging set f, start to end: the feed from tokens[1 - f], embedding
        and first norm, the layers, the logits, and the greedy token into tokens[f] (from the
        lm_head launch where its kernel can, kernels/gemv.argmax_epilogue, else an argmax launch)."""
        inp = self._staging[f].dev
        out = (self.residual[:1], self.hidden[:1])
        embedded = self.model.embed(inp.ids[:1], (inp.feed_rows[:1], self.tokens[1 - f]), out=out)
        hidden = self.model(
            inp.ids[:1], inp.positions[:1], self.kv_caches, self._meta(1, inp, splits), embedded=embedded
        )
        logits = self.model.compute_logits_argmax(hidden, self._best)
        if logits is not None:
            argmax_finish(self._best, self.tokens[f, :1])
        else:
            logits = self.model.compute_logits(hidden)
            argmax_rows(logits, out=self.tokens[f, :1])
        return logits

    def _warm_embed(self) -> None:
        """Compile DecoderModel.embed's launch in each form the engine uses (with and without a
        feed; eager steps, and the staging launch before a replay above one row) now, not at their
        first use while serving. Writes only the working buffers (their contents are per step)."""
        st = self._staging[0].dev
        n = self.max_batch
        out = (self.residual, self.hidden)
        staged = StagedInputs(st.words, self.inputs.words, st.tables, self.inputs.tables, 1)
        for fed in (None, (st.feed_rows, self.tokens[0])):
            for stage in (None, staged):
                self.model.embed(st.ids[:n], fed, out=out, staged=stage)

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # largest first, so smaller graphs reuse its pool memory; one row last, once per set
        plan = [(bs, s, None) for bs in reversed(self.sizes) if bs > 1 for s in self._levels(bs)]
        plan += [(1, s, f) for s in self._levels(1) for f in (0, 1)]
        self._warm_embed()
        for bs, s, f in plan:
            if f is None:
                forward = lambda bs=bs, s=s: self._forward(bs, s)  # noqa: E731
            else:
                forward = lambda f=f, s=s: self._forward_one_row(f, s)  # noqa: E731
            g, logits = capture_graph(forward, pool, stream)
            if f is None:
                self.graphs[bs, s] = (g, logits)
            else:
                self.one_row.setdefault(s, []).append((g, logits))
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.2fs",
            len(self.graphs) + 2 * len(self.one_row),
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the smallest graph that holds len(ids) rows; returns logits [n, V] (a view) and,
        for one row, its greedy token [1] (a view of `tokens`), else None."""
        n = len(ids)
        bs = next(b for b in self.sizes if b >= n)
        tiles = decode_tiles(int(seq_lens[:n].max()), self.cache_dtype)
        splits = decode_splits(bs, self.model.config.num_kv_heads, self.num_sms, tiles)
        f = self._flip
        self._flip ^= 1
        st = self._staging[f]
        st.copied.synchronize()  # this set's last copies (two steps ago) have left its pinned memory
        h_ids, h_pos, h_slots, h_feed, h_lens = st.views
        h_ids[:n], h_pos[:n], h_slots[:n], h_lens[:n] = ids, positions, slots, seq_lens
        h_ids[n:bs], h_pos[n:bs], h_slots[n:bs], h_lens[n:bs] = 0, 0, -1, 0
        feed_rows(feed, bs, out=h_feed[:bs])
        width = pack_tables(tables, st.tables_np)
        side = self._copy_in
        side.wait_event(st.consumed)  # what last read this set's device copy has run
        with torch.cuda.stream(side):
            st.dev.bytes.copy_(st.h_bytes, non_blocking=True)
            # packed rows (row 0 stays row 0 of the [rows, max blocks] view: the one-row graphs read it)
            st.dev.tables.view(-1)[: n * width].copy_(st.h_tables.view(-1)[: n * width], non_blocking=True)
            st.copied.record(side)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(st.copied)
        if bs == 1:
            if feed is not None and feed[2].data_ptr() != self.tokens[1 - f].data_ptr():
                self.tokens[1 - f, : len(feed[2])].copy_(feed[2])  # fed from a step of another shape
            g, logits = self.one_row[splits][f]
            g.replay()
            st.consumed.record(stream)
            return logits, self.tokens[f, :1]
        packed = st.dev.tables.view(-1)[: bs * width].view(bs, width)  # rows n..bs-1: stale, unread
        staged = StagedInputs(st.dev.words, self.inputs.words, packed, self.inputs.tables, width)
        fed = (st.dev.feed_rows[:bs], feed[2]) if feed is not None else None
        self.model.embed(st.dev.ids[:bs], fed, out=(self.residual[:bs], self.hidden[:bs]), staged=staged)
        st.consumed.record(stream)
        g, logits = self.graphs[bs, splits]
        g.replay()
        return logits[:n], None


# token counts of the graphs for steps with prefill chunks (MixedGraphs), up to the engine's per-step
# budget: a step takes the smallest that holds it. Above the largest, a step's GPU time outlasts
# launching it eagerly.
MIXED_SIZES = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def mixed_sizes(max_tokens: int) -> list[int]:
    """The MixedGraphs sizes of an engine whose steps hold at most `max_tokens` tokens."""
    return [t for t in MIXED_SIZES if t <= max_tokens]


class _MixedLayout:
    """The inputs of a step with prefill chunks in one byte buffer: per token (`tokens` entries) ids,
    positions, cache slots and feed rows (int64); per sequence (`seqs`) the query start offsets
    (seqs + 1) and context lengths (int32); the attention tile map (int32 pairs, `tiles` of them);
    last, the block-table rows packed by pack_tables (int32, room for seqs x width), so that a step
    copies the buffer up to its last row (`head` + rows x stride x 4 bytes) and no further."""

    def __init__(self, tokens: int, seqs: int, tiles: int, width: int) -> None:
        self.fields = [
            (torch.int64, tokens), (torch.int64, tokens), (torch.int64, tokens), (torch.int64, tokens),
            (torch.int32, seqs + 1), (torch.int32, seqs), (torch.int32, 2 * tiles), (torch.int32, seqs * width),
        ]  # fmt: skip
        self.head = _carved_bytes(self.fields[:-1])  # where the packed tables start
        self.nbytes = _carved_bytes(self.fields)
        self.tiles = tiles

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, feed_rows, query_start_loc, seq_lens, tile map [tiles, 2], packed
        tables (flat))."""
        *head, tiles, tables = _carve(buf, self.fields)
        return (*head, tiles.view(self.tiles, 2), tables)


class _MixedStaging:
    """Pinned host buffers of one step's inputs as _MixedLayout lays them out (numpy views to write
    them), and `copied`: recorded after their copy to the device, which must end before they are
    rewritten."""

    def __init__(self, layout: _MixedLayout) -> None:
        self.h_bytes = torch.zeros(layout.nbytes, dtype=torch.uint8).pin_memory()
        self.views = tuple(v.numpy() for v in layout.views(self.h_bytes))
        self.copied = torch.cuda.Event()


class MixedGraphs:
    """CUDA graphs for steps that hold a prefill chunk (and decodes beside it), attention included.

    Such a step launched eagerly costs ~14.5 ms of host time for a Llama-8B (~160 Triton launches and
    ~130 cuBLAS calls through the Python layers), about twice its GPU time at 300 tokens (H100,
    docs/benchmarks.md, fourteenth session): the card waits for the host. For each token count of
    MIXED_SIZES, one graph holds the step from the first layer's QKV projection to the final norm.
    Every input it reads sits in fixed device buffers: ids, positions and cache slots per token,
    query offsets, context lengths and block tables per sequence, and the attention tile map
    (kernels/paged_attention.fill_tile_map), whose fixed number of entries makes the attention grid
    independent of how the tokens split into sequences. One host->device copy (_MixedLayout, up to
    the step's last block-table row) fills them before the embedding launch, which also takes the
    step's fed token ids and moves the packed table rows into the graph's table. Rows past the real tokens
    are padding: token id 0, slot -1 (the cache write skips them), in no attention tile, so their
    attention output rows hold whatever the graph pool held there (any bits, non-finite ones
    included); every other captured kernel treats rows independently (per-token activation scales
    included), so they never reach a real row. A kernel that mixed rows (a per-tensor scale, a
    finiteness check over the batch) would have to zero them first.

    Memory: each size keeps its output rows (the final norm's: 5,680 rows over MIXED_SIZES, 46.5 MB
    at hidden size 4,096 in bf16), and the sizes share one pool, so a graph's output may lie where
    another graph keeps its intermediates: read it before the next replay of any of them (run's
    caller does).
    """

    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = mixed_sizes(max_tokens)
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        cfg = model.config
        self.group = cfg.num_heads // cfg.num_kv_heads
        n = self.max_tokens
        self.max_seqs = min(max_seqs, n)  # a sequence has at least one token in a step
        self.tile_counts = {t: tile_map_entries(t, self.max_seqs, self.group) for t in self.sizes}
        width = table_width(max_blocks_per_seq)
        self.layout = _MixedLayout(n, self.max_seqs, max(self.tile_counts.values(), default=0), width)
        self.bytes = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        views = self.layout.views(self.bytes)
        self.ids, self.positions, self.slots, self.feed_rows, self.qsl, self.seq_lens = views[:6]
        self.tiles, self.packed = views[6:]
        self.slots.fill_(-1)  # the capture runs each graph once: no cache writes, no attention tiles
        self.tiles.fill_(-1)
        self.tables = torch.zeros((self.max_seqs, width), dtype=torch.int32, device=device)
        self._no_words = self.bytes.view(torch.int32)[:0]  # embed's staged copy moves tables only
        # pinned host copies, two used in turn: one is written while the other's copy may be in flight
        self._staging = [_MixedStaging(self.layout) for _ in range(2)]
        self._flip = 0
        emb = model.model.embed_tokens.weight
        self.residual = torch.zeros((n, cfg.hidden_size), dtype=emb.dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)  # the first layer's normalized input
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps run through the graphs (tests read it)

    def _forward(self, t: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:t],
            query_start_loc=self.qsl,
            seq_lens=self.seq_lens,
            block_tables=self.tables,
            max_query_len=t,  # an upper bound: the tile map says which tiles hold tokens
            query_lens_host=[],
            seq_lens_host=[],
            tile_map=self.tiles[: self.tile_counts[t]],
        )
        embedded = (self.residual[:t], self.hidden[:t])
        return self.model(self.ids[:t], self.positions[:t], self.kv_caches, meta, embedded=embedded)

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for t in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            self.graphs[t] = capture_graph(lambda t=t: self._forward(t), pool, stream)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        log.info(
            "captured %d CUDA graphs for steps with prefill chunks (up to %d tokens) in %.2fs",
            len(self.graphs),
            self.max_tokens,
            seconds,
        )
        return seconds

    def holds(self, tokens: int, seqs: int) -> bool:
        return tokens <= self.max_tokens and seqs <= self.max_seqs

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        query_lens: list[int],
        seq_lens: list[int],
        tables: list[np.ndarray],
        feed: Feed | None = None,
    ) -> torch.Tensor:
        """DecoderModel.forward for a step of n = len(ids) tokens that `holds`: the final hidden states
        [n, hidden], a view of graph memory that the next replay of any of these graphs may
        overwrite (the class docstring's Memory)."""
        n, b = len(ids), len(query_lens)
        t = next(s for s in self.sizes if s >= n)
        st = self._staging[self._flip]
        self._flip ^= 1
        st.copied.synchronize()  # this set's last copy (two steps ago) has left its pinned memory
        h_ids, h_pos, h_slots, h_feed, h_qsl, h_lens, h_tiles, h_tables = st.views
        h_ids[:n], h_pos[:n], h_slots[:n] = ids, positions, slots
        h_ids[n:t], h_pos[n:t], h_slots[n:t] = 0, 0, -1
        feed_rows(feed, t, out=h_feed[:t])
        q = np.asarray(query_lens, dtype=np.int32)
        lens = np.asarray(seq_lens, dtype=np.int32)
        h_qsl[0] = 0
        np.cumsum(q, out=h_qsl[1 : b + 1])
        h_lens[:b] = lens
        fill_tile_map(q, lens, self.group, h_tiles[: self.tile_counts[t]])
        width = pack_tables(tables, h_tables)
        # on the engine's stream: after the previous step's replay, which read these buffers
        upto = self.layout.head + b * width * 4
        self.bytes[:upto].copy_(st.h_bytes[:upto], non_blocking=True)
        st.copied.record()
        fed = (self.feed_rows[:t], feed[2]) if feed is not None else None
        tabs = StagedInputs(
            self._no_words, self._no_words, self.packed[: b * width].view(b, width), self.tables, width, b
        )
        self.model.embed(self.ids[:t], fed, out=(self.residual[:t], self.hidden[:t]), staged=tabs)
        g, out = self.graphs[t]
        g.replay()
        self.replays += 1
        return out[:n]
