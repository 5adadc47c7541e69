"""A request's state as the scheduler and the block manager see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from .sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token whose value is still on the device (see engine.step)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # prompt followed by every generated token; the model's input comes from here
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (cached prefix included)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    # chain hashes of the full blocks already registered in the prefix cache, in order
    block_hashes: list[bytes] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_scheduled_time: float | None = None
    has_first_token: bool = False  # its first sampled token has resolved (prompt tokens counted)
    # row of this sequence's placeholder in the launched step's sampled tensor, -1 when none
    pending_row: int = -1
    # its last placeholder reaches max_tokens / max_model_len: finished once it resolves
    stop_pending: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        # int32 mirror of block_table, so a step copies rows into its batch table without converting lists
        self.block_array = np.zeros(max(8, len(self.prompt_token_ids) // 8), dtype=np.int32)

    def append_block(self, block_id: int) -> None:
        n = len(self.block_table)
        if n == len(self.block_array):
            self.block_array = np.concatenate([self.block_array, np.zeros_like(self.block_array)])
        self.block_array[n] = block_id
        self.block_table.append(block_id)

    def clear_blocks(self) -> None:
        self.block_table = []
        self.block_hashes = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_resolved_output_tokens(self) -> int:
        """Output tokens whose values are known: a step in flight has appended a PLACEHOLDER."""
        n, base = self.num_output_tokens, len(self.prompt_token_ids)
        while n and self.token_ids[base + n - 1] == PLACEHOLDER:
            n -= 1
        return n
