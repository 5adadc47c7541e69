"""Model runner: owns the model and the KV cache, turns a SchedulerOutput into logits.

It knows nothing about requests beyond token ids, positions and block tables; sampling and
stopping stay in the engine. On CUDA, decode-only steps replay a captured graph; steps with
prefill chunks of up to 1,024 tokens replay another kind (cuda_graphs.MixedGraphs), and larger
ones run eagerly through the same Triton kernels.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels
from .config import EngineConfig
from .errors import InvalidRequestError
from .layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
    alloc_kv_cache,
    table_width,
)
from .layers.linear import Linear
from .loader import load_model_weights
from .models import DecoderModel
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)


Feed = tuple[list[int], list[int], torch.Tensor]


# a mixed step's lm_head runs at up to this many times its sampled rows where a tuned plan is there
# (ModelRunner._lm_head_rows)
LM_HEAD_PAD = 1.5


def feed_rows(feed: Feed | None, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """A feed (token indices, rows of the source) as one int64 entry per token of the batch of n:
    the source row its id comes from, or -1 (DecoderModel.embed's `feed` rows); written into `out`
    (int64 [n], e.g. a decode graph's pinned staging) where given."""
    rows = np.empty(n, dtype=np.int64) if out is None else out
    rows[:] = -1
    if feed is not None:
        rows[feed[0]] = feed[1]
    return rows


@dataclass
class StepLogits:
    logits: torch.Tensor  # [N, V] float32 or the model's 16-bit dtype, one row per sampling sequence
    rows: list[int]  # index into SchedulerOutput.scheduled for each logits row
    # each row's first maximum [N] int64 where the step computed it already (a one-row decode
    # graph does), else None; sampling starts from it (sampling.sample_device's `greedy`)
    greedy: torch.Tensor | None = None


def select_backend(device: torch.device, choice: str) -> AttentionBackend:
    if choice == "torch" or (choice == "auto" and (device.type != "cuda" or not kernels.AVAILABLE)):
        return TorchAttentionBackend()
    if device.type != "cuda" or not kernels.AVAILABLE:
        raise ValueError("the triton attention backend needs a CUDA device and Triton")
    return TritonAttentionBackend()


@dataclass
class HostBatch:
    """One step's inputs on the host (numpy), built without per-token Python loops."""

    ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    query_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    arrays: list[np.ndarray]  # int32 block tables (views of each sequence's mirror)
    sample_index: list[int]  # flat token index of each sampling row
    rows: list[int]  # scheduled index of each sampling row
    decode_only: bool


def build_host_batch(out: SchedulerOutput, block_size: int) -> HostBatch:
    n_tok = out.num_tokens
    ids = np.empty(n_tok, dtype=np.int64)
    pos = np.empty(n_tok, dtype=np.int64)
    slots = np.empty(n_tok, dtype=np.int64)
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    arrays: list[np.ndarray] = []
    sample_index: list[int] = []
    rows: list[int] = []
    decode_only = True
    o = 0
    for j, s in enumerate(out.scheduled):
        seq, n = s.seq, s.num_new_tokens
        start = seq.num_computed_tokens
        end = start + n
        table = seq.block_table
        if not s.samples:  # a 1-token prefill chunk is not a decode: graphs return a row per token
            decode_only = False
        if n == 1:
            ids[o] = seq.token_ids[start]
            pos[o] = start
            slots[o] = table[start // block_size] * block_size + start % block_size
        else:
            decode_only = False
            ids[o : o + n] = seq.token_ids[start:end]
            p = np.arange(start, end, dtype=np.int64)
            pos[o : o + n] = p
            blocks = np.asarray(table[start // block_size : (end - 1) // block_size + 1], dtype=np.int64)
            slots[o : o + n] = blocks[p // block_size - start // block_size] * block_size + p % block_size
        o += n
        query_lens.append(n)
        seq_lens.append(end)
        tables.append(table)
        arrays.append(seq.block_array[: len(table)])
        if s.samples:
            sample_index.append(o - 1)
            rows.append(j)
    return HostBatch(ids, pos, slots, query_lens, seq_lens, tables, arrays, sample_index, rows, decode_only)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.mc = config.model_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_torch_dtype  # the model dtype, or float8_e4m3fn (kv_cache_dtype fp8)
        self.block_size = config.block_size
        self.timings: dict[str, float] = {}
        self.backend = select_backend(self.device, config.attention_backend)
        assert config.max_model_len is not None
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            self.num_sms = kernels.num_sms(self.device)
            if kernels.AVAILABLE:
                from .kernels import pdl

                # programmatic dependent launch for the batch-1 weight-streaming kernels (Hopper+)
                pdl.set_enabled(pdl.supported(self.device))
                log.info("programmatic dependent launch: %s", "on" if pdl.enabled() else "off")
        t0 = time.perf_counter()
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model = DecoderModel(self.mc, self.backend, max_position=config.max_model_len)
            finally:
                torch.set_default_dtype(prev)
        self.model.eval()
        load_model_weights(self.model, config.model, self.dtype)  # returns after a CUDA synchronize
        self.timings["load_weights"] = time.perf_counter() - t0
        self.num_blocks = self._determine_num_blocks()
        self.kv_caches = self._alloc_kv(self.num_blocks)
        log.info(
            "KV cache: %d blocks of %d tokens = %d token slots (%.2f GiB, %s)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block() / 2**30,
            str(self.kv_dtype).removeprefix("torch."),
        )
        # a side stream for the sampled ids' device->host copies (sampling.to_host_async)
        self.copy_out_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graphs = None
        self.mixed = None  # graphs for steps with prefill chunks (cuda_graphs.MixedGraphs)
        self.use_graphs = (
            self.device.type == "cuda"
            and not config.enforce_eager
            and isinstance(self.backend, TritonAttentionBackend)
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def warmup(self) -> None:
        """Capture the decode CUDA graphs and compile the launches they do not hold (CUDA only); the
        engine then runs real requests."""
        if self.use_graphs and "gemm_tuning" not in self.timings:
            seconds = self._tune_gemms()
            if seconds is not None:
                self.timings["gemm_tuning"] = seconds
        if self.use_graphs and self.graphs is None:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.config.max_num_seqs,
                self.max_blocks_per_seq,
                self.device,
                self.num_sms,
            )
            self.timings["cuda_graphs"] = self.graphs.capture()
        if self.use_graphs and self.mixed is None and (limit := self._mixed_graph_tokens()) is not None:
            from .cuda_graphs import MixedGraphs

            self.mixed = MixedGraphs(
                self.model,
                self.kv_caches,
                limit,
                self.config.max_num_seqs,
                self.max_blocks_per_seq,
                self.device,
            )
            if self.mixed.sizes:
                self.timings["mixed_graphs"] = self.mixed.capture()
            else:
                self.mixed = None
        if self.device.type == "cuda" and kernels.AVAILABLE:
            # the greedy launch of batches above elementwise.ARGMAX_SPLIT_ROWS rows (one program per
            # row) compiles now, not at the first such batch (bench/compile_watch.py); its only
            # per-call integers are the vocabulary size and row stride, the same for every batch
            from .kernels.elementwise import argmax_rows

            argmax_rows(
                torch.zeros((1, self.mc.vocab_size), dtype=torch.float32, device=self.device), splits=1
            )

    def _mixed_graph_tokens(self) -> int | None:
        """The most tokens a MixedGraphs step may hold, or None with mixed graphs turned off
        (INFERFLEET_MIXED_GRAPHS=0): the engine's step budget, but no larger than a batch the
        decoder's quantized layers take without widening their weights (LinearMethod.widens_above):
        a graph's pool would keep the widened copies."""
        if os.environ.get("INFERFLEET_MIXED_GRAPHS", "1") == "0":
            return None
        assert self.config.max_num_batched_tokens is not None
        widen = [
            m.method.widens_above(m)
            for m in self.model.model.modules()
            if isinstance(m, Linear) and m.method is not None
        ]
        return min([self.config.max_num_batched_tokens, *(w for w in widen if w is not None)])

    def _tune_gemms(self) -> float | None:
        """Pick cuBLASLt algorithms for the 16-bit projections at the row counts the CUDA graphs will
        run them at (kernels/blaslt.py, cuda_graphs.projection_rows), before they are captured."""
        from .cuda_graphs import projection_rows
        from .kernels import blaslt
        from .layers.linear import SKINNY_MAX_M

        rows, head_rows = projection_rows(self.config.max_num_seqs, self._mixed_graph_tokens(), SKINNY_MAX_M)
        return blaslt.tune(self.model, rows, head_rows, self.device)

    def _alloc_kv(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (K, V) caches of `num_blocks` blocks for every layer."""
        mc = self.mc
        return [
            alloc_kv_cache(
                num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim, self.kv_dtype, self.device
            )
            for _ in range(mc.num_layers)
        ]

    def bytes_per_block(self) -> int:
        elem = self.kv_dtype.itemsize
        return 2 * self.mc.num_layers * self.block_size * self.mc.num_kv_heads * self.mc.head_dim * elem

    def _determine_num_blocks(self) -> int:
        cfg = self.config
        assert cfg.max_model_len is not None
        min_blocks = self.max_blocks_per_seq  # one full-length sequence must fit
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        else:
            if cfg.kv_cache_memory_bytes is not None:
                budget = cfg.kv_cache_memory_bytes
            elif self.device.type == "cuda":
                budget = self._cuda_kv_budget()
            else:
                budget = cfg.cpu_kv_cache_bytes
            n = budget // self.bytes_per_block()
            # never more than every sequence at full length could use
            n = min(n, cfg.max_num_seqs * min_blocks + 1)
        if n < min_blocks:
            raise InvalidRequestError(
                f"the KV cache holds {n} blocks ({n * self.block_size} tokens) but max_model_len "
                f"{cfg.max_model_len} needs {min_blocks}: give it more memory or lower max_model_len",
                param="max_model_len",
            )
        return int(n)

    def _cuda_kv_budget(self) -> int:
        """Memory left for KV after weights and the activation peak of the largest step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_run()
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        # CUDA graphs' private pools and cuBLAS workspaces are not in the profile: keep a margin
        margin = 512 * 2**20
        budget = int(total * self.config.gpu_memory_utilization) - peak - used_by_others - margin
        log.info(
            "CUDA memory: total %.1f GiB, weights + activation peak %.2f GiB, KV budget %.2f GiB",
            total / 2**30,
            peak / 2**30,
            budget / 2**30,
        )
        return max(budget, 0)

    def profile_run(self) -> None:
        """One forward of the largest step the scheduler may build (a single long prefill)."""
        cfg = self.config
        assert cfg.max_num_batched_tokens is not None and cfg.max_model_len is not None
        t = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        nb = -(-t // self.block_size)
        kv = self._alloc_kv(nb)
        meta = self._metadata([t], [t], [list(range(nb))], torch.arange(t, device=self.device))
        ids = torch.zeros(t, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(t, device=self.device), kv, meta)
            self.model.compute_logits(hidden[-min(t, cfg.max_num_seqs) :])
        del kv

    def _metadata(
        self,
        query_lens: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        slots: torch.Tensor,
        arrays: list[np.ndarray] | None = None,
    ) -> AttentionMetadata:
        dev = self.device
        width = table_width(max(len(t) for t in tables))
        bt = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(arrays if arrays is not None else tables):
            bt[i, : len(t)] = t
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        max_q = max(query_lens)
        splits = 1
        if max_q == 1 and isinstance(self.backend, TritonAttentionBackend):
            from .cuda_graphs import decode_splits
            from .kernels.paged_attention import decode_tiles

            tiles = decode_tiles(max(seq_lens), self.kv_dtype)
            splits = decode_splits(len(query_lens), self.mc.num_kv_heads, self.num_sms, tiles)
        return AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=kernels.to_device(qsl, dev),
            seq_lens=kernels.to_device(np.asarray(seq_lens, dtype=np.int32), dev),
            block_tables=kernels.to_device(bt, dev),
            max_query_len=max_q,
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            num_splits=splits,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, feed: Feed | None = None) -> StepLogits:
        """Run the batch; returns logits without waiting for the device.

        `feed` = (token indices in this batch, rows of `source`, source): input tokens that are
        still placeholders on the host, taken from the previous step's sampled ids on the device.
        """
        hb = build_host_batch(out, self.block_size)
        dev = self.device
        if self.graphs is not None and hb.decode_only and len(hb.ids) <= self.graphs.max_batch:
            seq_lens = np.asarray(hb.seq_lens, dtype=np.int32)
            logits, greedy = self.graphs.run(hb.ids, hb.positions, hb.slots, seq_lens, hb.arrays, feed)
            # in a decode-only step every row samples, in order (build_host_batch checks it)
            return StepLogits(logits, hb.rows, greedy)
        if self.mixed is not None and self.mixed.holds(len(hb.ids), len(hb.query_lens)):
            hidden = self.mixed.run(
                hb.ids, hb.positions, hb.slots, hb.query_lens, hb.seq_lens, hb.arrays, feed
            )
            return self._logits(hidden, hb)
        slot_t = kernels.to_device(hb.slots, dev)
        meta = self._metadata(hb.query_lens, hb.seq_lens, hb.tables, slot_t, hb.arrays)
        ids = kernels.to_device(hb.ids, dev)
        fed = None
        if feed is not None:
            fed = (kernels.to_device(feed_rows(feed, len(hb.ids)), dev), feed[2])
        positions = kernels.to_device(hb.positions, dev)
        return self._logits(self.model(ids, positions, self.kv_caches, meta, feed=fed), hb)

    def _logits(self, hidden: torch.Tensor, hb: HostBatch) -> StepLogits:
        """The logits of the step's sampling rows from its final hidden states."""
        dev = self.device
        if not hb.sample_index:
            return StepLogits(torch.empty(0, self.mc.vocab_size, device=dev), [])
        n = len(hb.sample_index)
        rows = hb.sample_index + [hb.sample_index[0]] * (self._lm_head_rows(n) - n)
        idx = kernels.to_device(np.asarray(rows, dtype=np.int64), dev)
        return StepLogits(self.model.compute_logits(hidden[idx])[:n], hb.rows)

    def _lm_head_rows(self, n: int) -> int:
        """How many rows to run the lm_head at for n sampled rows: n, or the fewest rows above it
        (within LM_HEAD_PAD) at which startup's GEMM tuning kept a cuBLASLt plan for it
        (kernels/blaslt, the decode graphs' sizes), the extra rows repeating the first and dropped
        after. A mixed step samples any number of rows, which F.linear runs untuned; below ~256 rows
        the product is bound by reading the weight, so a few more rows cost little. Llama-3.1-8B on
        the H100 (bench/gemm_tuning_report.py, docs/benchmarks.md, nineteenth session): F.linear
        381 us at 24 rows against a plan's 359, 401 at 160 against 391; from 64 to 128 and above
        160 rows no plan beat F.linear by the tuning's margin, so those run as they are."""
        from .kernels import blaslt
        from .layers.linear import SKINNY_MAX_M

        head = getattr(self.model, "lm_head", None)
        if (
            n <= SKINNY_MAX_M
            or self.device.type != "cuda"
            or not isinstance(head, Linear)
            or head.method is not None
            or head.bias is not None
        ):
            return n
        lt = blaslt.get(self.device)
        rows = lt.planned_rows(head.weight, n) if lt is not None else None
        return rows if rows is not None and rows <= n * LM_HEAD_PAD else n
