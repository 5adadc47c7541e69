"""The attention tile map of steps with prefill chunks (kernels/paged_attention.fill_tile_map):
every query tile of the step once, the longest first, padding after, within the bound that sizes
the CUDA graphs' grids (tile_map_entries); and the layout of the buffer those graphs read their
inputs from. The kernel's use of the map: tests/gpu/kernel_cases.py."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from inferfleet.worker.cuda_graphs import _MixedLayout, pack_tables
from inferfleet.worker.kernels.paged_attention import (
    fill_tile_map,
    map_block_q,
    tile_map_entries,
)
from inferfleet.worker.layers.attention import TABLE_ALIGN


def random_step(rng: random.Random, tokens: int, max_seqs: int) -> tuple[list[int], list[int]]:
    """Query lengths summing to at most `tokens` over at most max_seqs sequences (decodes, short and
    long chunks), and context lengths of at least each query length."""
    qlens: list[int] = []
    left = tokens
    while left and len(qlens) < max_seqs:
        q = rng.choice([1, 1, 1, rng.randint(1, left)])
        q = min(q, left)
        qlens.append(q)
        left -= q
    return qlens, [q + rng.randint(0, 3000) for q in qlens]


@pytest.mark.parametrize(("group", "block_q"), [(1, None), (4, None), (8, None), (4, 1), (4, 4), (8, 2)])
def test_every_tile_once_longest_first_within_the_bound(group: int, block_q: int | None) -> None:
    """block_q: a map launch's map_block_q tuning, None for the default (map_block_q(group))."""
    rng = random.Random(group)
    bq = block_q or map_block_q(group)
    for _ in range(300):
        tokens, max_seqs = rng.choice([16, 64, 512, 1024]), rng.choice([1, 8, 256])
        qlens, ctx = random_step(rng, tokens, max_seqs)
        entries = tile_map_entries(tokens, max_seqs, group, block_q=block_q)
        out = np.full((entries, 2), 99, dtype=np.int32)
        n = fill_tile_map(np.array(qlens), np.array(ctx), group, out, block_q=block_q)
        want = {(s, t) for s, q in enumerate(qlens) for t in range(-(-q // bq))}
        got = [tuple(int(v) for v in row) for row in out[:n]]
        assert len(got) == n == len(want) and set(got) == want
        assert (out[n:] == -1).all()
        # keys each tile reads: the cached context plus its last token's causal span
        keys = [ctx[s] - qlens[s] + min((t + 1) * bq, qlens[s]) for s, t in got]
        assert keys == sorted(keys, reverse=True)


def test_a_map_too_small_is_refused() -> None:
    out = np.zeros((2, 2), dtype=np.int32)
    with pytest.raises(AssertionError, match="3 query tiles"):
        fill_tile_map(np.array([1, 1, 1]), np.array([5, 5, 5]), 4, out)


def test_decode_tiles_take_one_token_sequences_only() -> None:
    """A decode-tile map (max_query_len 1: one query token per program) lists each one-token
    sequence once, longest context first, leaves out sequences of query length 0, and refuses a
    longer one, which the launch would cut to its first token."""
    out = np.zeros((4, 2), dtype=np.int32)
    assert fill_tile_map(np.array([1, 0, 1, 1]), np.array([30, 9, 700, 5]), 4, out, decode=True) == 3
    assert out.tolist() == [[2, 0], [0, 0], [3, 0], [-1, -1]]
    with pytest.raises(AssertionError, match="one query token"):
        fill_tile_map(np.array([1, 2]), np.array([5, 5]), 4, out, decode=True)


@pytest.mark.parametrize(
    ("tokens", "seqs", "tiles", "width"), [(16, 16, 17, 16), (1024, 255, 320, 48), (33, 7, 9, 16)]
)
def test_mixed_graph_inputs_lie_apart_and_aligned(tokens: int, seqs: int, tiles: int, width: int) -> None:
    """MixedGraphs' input buffer (cuda_graphs._MixedLayout): every field 16-byte aligned (Triton
    compiled the kernels that read them for aligned pointers) and none overlapping another, with
    the sizes each holds."""
    layout = _MixedLayout(tokens, seqs, tiles, width)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buf)
    sizes = [tokens] * 4 + [seqs + 1, seqs, 2 * tiles, seqs * width]
    spans = []
    for v, n in zip(views, sizes):
        assert v.numel() == n
        start = v.data_ptr() - buf.data_ptr()
        assert start % 16 == 0
        spans.append((start, start + v.numel() * v.element_size()))
    assert views[-2].shape == (tiles, 2)
    # the packed tables come last: a step copies the buffer up to its last table row only
    assert layout.head == spans[-1][0] and all(end <= layout.head for _, end in spans[:-1])
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)) and spans[-1][1] <= layout.nbytes


def test_pack_tables_rows_at_a_padded_common_stride() -> None:
    """A step's block-table rows one after another at the longest row's length padded to
    TABLE_ALIGN (the stride the graphs' table copy compiles for), each row's entries where the
    graph's copy reads them, and nothing written past the last row; too many entries are refused."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        lens = rng.integers(1, 70, size=int(rng.integers(1, 12)))
        tables = [rng.integers(0, 10_000, size=n).astype(np.int32) for n in lens]
        out = np.full(12 * 80, -7, dtype=np.int32)
        w = pack_tables(tables, out)
        assert w % TABLE_ALIGN == 0 and w - TABLE_ALIGN < max(lens) <= w
        for i, t in enumerate(tables):
            assert (out[i * w : i * w + len(t)] == t).all()
        assert (out[len(tables) * w :] == -7).all()
    with pytest.raises(AssertionError, match="staging holds"):
        pack_tables([np.zeros(17, dtype=np.int32)] * 3, np.zeros(90, dtype=np.int32))


def test_map_block_q_default_reaches_the_map_and_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The map launch's default tile size is map_tile_rows (token, head) rows, whatever the group,
    unless map_block_q names the tokens; fill_tile_map and tile_map_entries use it unless told
    otherwise, so a map filled with the defaults always matches a launch with the default tuning."""
    from inferfleet.worker.kernels import paged_attention as pa

    rows = pa.DEFAULT_TUNING["map_tile_rows"]
    assert [pa.map_block_q(g) for g in (1, 4, 8, 64)] == [rows, rows // 4, rows // 8, 1]
    monkeypatch.setitem(pa.DEFAULT_TUNING, "map_tile_rows", 64)
    assert pa.map_block_q(4) == 16 and tile_map_entries(64, 8, 4) == 64 // 16 + 8
    monkeypatch.setitem(pa.DEFAULT_TUNING, "map_block_q", 8)
    assert pa.map_block_q(4) == 8 and tile_map_entries(64, 8, 4) == 64 // 8 + 8
    out = np.zeros((tile_map_entries(64, 8, 4), 2), dtype=np.int32)
    assert fill_tile_map(np.array([1, 30, 9]), np.array([5, 40, 700]), 4, out) == 1 + 4 + 2
