"""Paged KV block manager: a pool of fixed-size blocks, ref counts, and prefix caching.

    block_table of a sequence (block_size = 4):
      tokens   [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9 __ __]
      blocks   [    17    ][     3     ][     42    ]
      hashes   [    h0    ][     h1    ]   (partial block: no hash yet)
      h0 = H(root, t0..t3), h1 = H(h0, t4..t7): a block's hash names its whole prefix

A full block, once computed, is registered under its chain hash. Another sequence whose prompt
starts with the same tokens takes the block (ref_count += 1) instead of recomputing it. A block
whose ref_count drops to 0 goes to the free list but keeps its hash: until the block is handed out
again (least recently freed first), a later request can still revive it.

Running out of blocks is a return value (False / 0), never an exception: the scheduler preempts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence

_ROOT = b"inferfleet-prefix-root"


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    # what the hash stands for, compared on every hit so a hash collision can never serve wrong KV
    parent: bytes | None = None
    tokens: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order (front is evicted first); dict for O(1) removal on a hit
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # chain hash -> block id
        self.free_epoch = 0  # bumped whenever blocks are released (a blocked admission may now fit)
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / len(self.blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Extend the block table to hold `num_new_tokens` more tokens. All or nothing."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.append_block(self._take_free())
        return True

    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        b = self.blocks[bid]
        assert b.ref_count == 0
        if b.hash is not None:  # evict its cached identity
            if self._cached.get(b.hash) == bid:
                del self._cached[b.hash]
            b.hash, b.parent, b.tokens = None, None, ()
        b.ref_count = 1
        return bid

    def match_prefix(self, seq: Sequence) -> int:
        """At admission (empty block table): take cached blocks for the longest cached prefix.

        At least one token is always left to compute, because the step must produce logits.
        Returns the number of tokens now served from the cache. Statistics are counted by
        `record_admission`, once the sequence is really admitted.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = _ROOT
        hashes: list[bytes] = []
        for i in range(max_blocks):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = chain_hash(parent, tokens)
            bid = self._cached.get(h)
            if bid is None:
                break
            b = self.blocks[bid]
            if b.parent != parent or b.tokens != tuple(tokens):
                break
            if b.ref_count == 0:
                del self._free[bid]
            b.ref_count += 1
            seq.append_block(bid)
            hashes.append(h)
            parent = h
        seq.block_hashes = hashes
        n = len(hashes) * bs
        seq.num_computed_tokens = n
        return n

    def record_admission(self, seq: Sequence, cached: int) -> None:
        """Count one admission's prefix-cache lookup. The request reports the prompt tokens its
        first admission found cached (a readmission after preemption may match generated ones)."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
        if seq.first_scheduled_time is None:
            seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the blocks that became full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        known = seq.num_tokens
        while known > 0 and seq.token_ids[known - 1] < 0:  # placeholders: values not read yet
            known -= 1
        full = min(seq.num_computed_tokens, known) // bs
        full = min(full, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT
        for i in range(len(seq.block_hashes), full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = chain_hash(parent, tokens)
            b = self.blocks[seq.block_table[i]]
            if b.hash is None and h not in self._cached:
                b.hash, b.parent, b.tokens = h, parent, tuple(tokens)
                self._cached[h] = b.block_id
            seq.block_hashes.append(h)
            parent = h

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Blocks without a hash are reused first; among cached ones
        the tail of a prefix is evicted before its shared head."""
        if seq.block_table:
            self.free_epoch += 1
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            assert b.ref_count > 0
            b.ref_count -= 1
            if b.ref_count == 0:
                self._free[bid] = None
                if b.hash is None:  # holds nothing reusable: hand it out before cached blocks
                    self._free.move_to_end(bid, last=False)
        seq.clear_blocks()
        seq.num_computed_tokens = 0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Ref counts equal the number of live block-table entries; free list = blocks with ref 0."""
        counts = [0] * len(self.blocks)
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table), "a block appears twice in one table"
            assert s.block_array[: len(s.block_table)].tolist() == s.block_table
            for bid in s.block_table:
                counts[bid] += 1
        for b in self.blocks:
            assert b.ref_count == counts[b.block_id], (b.block_id, b.ref_count, counts[b.block_id])
            assert (b.block_id in self._free) == (b.ref_count == 0)
        for h, bid in self._cached.items():
            assert self.blocks[bid].hash == h
