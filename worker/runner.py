"""Model runner: owns the model and the KV cache, turns a SchedulerOutput into logits.

It knows nothing about requests beyond token ids, positions and block tables; sampling and
stopping stay in the engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .config import EngineConfig
from .layers.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from .loader import load_model_weights
from .models import DecoderModel
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepLogits:
    logits: torch.Tensor  # [N, V] float32, one row per scheduled sequence that samples
    rows: list[int]  # index into SchedulerOutput.scheduled for each logits row


def select_backend(device: torch.device) -> AttentionBackend:
    return TorchAttentionBackend()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.mc = config.model_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.timings: dict[str, float] = {}
        self.backend = select_backend(self.device)
        assert config.max_model_len is not None
        t0 = time.perf_counter()
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model = DecoderModel(self.mc, self.backend, max_position=config.max_model_len)
            finally:
                torch.set_default_dtype(prev)
        self.model.eval()
        load_model_weights(self.model, config.model, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["load_weights"] = time.perf_counter() - t0
        self.num_blocks = self._determine_num_blocks()
        shape = (self.num_blocks, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.mc.num_layers)
        ]
        log.info(
            "KV cache: %d blocks of %d tokens = %d token slots (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block() / 2**20,
        )

    def warmup(self) -> None:
        """Device-specific warm-up before serving (CUDA graphs are captured here)."""

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.mc.num_layers * self.block_size * self.mc.num_kv_heads * self.mc.head_dim * elem

    def _determine_num_blocks(self) -> int:
        cfg = self.config
        assert cfg.max_model_len is not None
        min_blocks = -(-cfg.max_model_len // self.block_size)  # one full-length sequence must fit
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
            raise ValueError(
                f"the KV cache holds {n} blocks ({n * self.block_size} tokens) but max_model_len "
                f"{cfg.max_model_len} needs {min_blocks}: give it more memory or lower max_model_len"
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
        budget = int(total * self.config.gpu_memory_utilization) - peak - used_by_others
        log.info(
            "CUDA memory: total %.1f GiB, weights+activation peak %.1f GiB, KV budget %.1f GiB",
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
        shape = (nb, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        kv = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2 for _ in range(self.mc.num_layers)
        ]
        meta = self._metadata([t], [t], [list(range(nb))], torch.arange(t, device=self.device))
        ids = torch.zeros(t, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(t, device=self.device), kv, meta)
            self.model.compute_logits(hidden[-1:])
        del kv

    def _metadata(
        self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], slots: torch.Tensor
    ) -> AttentionMetadata:
        dev = self.device
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            block_tables_host=tables,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepLogits:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # flat token index whose hidden state is sampled
        rows: list[int] = []
        for j, s in enumerate(out.scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if s.samples:
                sample_rows.append(len(ids) - 1)
                rows.append(j)
        dev = self.device
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        meta = self._metadata(query_lens, seq_lens, tables, slot_t)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )
        if not sample_rows:
            return StepLogits(torch.empty(0, self.mc.vocab_size, device=dev), [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        return StepLogits(logits, rows)
