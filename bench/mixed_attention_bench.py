"""Attention of a step with a prefill chunk beside decodes, as W1's offline schedule builds them.

    python bench/mixed_attention_bench.py --out $OUT

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens, a
bf16 cache, or e4m3 with scales under `--cache fp8`, stored head-major), pages scattered at
random. A step: `--decodes` sequences with contexts uniform in [100, 2048] (W1-like) and one
prompt chunk of `--chunk` tokens after `--cached` tokens of its own. One layer's attention
launches, each checked against the first and timed as replays of a CUDA graph of 10 launches (the
GPU's time, not the host's), median over --rounds rounds that take every variant in turn; each
case's KV is far larger than L2:

- grid: one launch over every sequence's query tiles up to the longest chunk (prefill tiles for
  the decodes too), as eager steps launch it;
- map: one tile-map launch with the default map tuning, as cuda_graphs.MixedGraphs launches it
  (since the eighteenth session 16-row tiles; before, the prefill tiles of 64 rows);
- map split: a decode-tile map over the one-token sequences and a default map over the chunk;
- map split, two streams: the same two launches on two streams (two branches of the graph);
- map bn.. w.. s.. [q..]: the map launch under each --map-tunings entry;
- decodes alone: the decode sequences by themselves in decode tiles (a decode-only step's launch).

Prints a table last and writes mixed_attention_bench.json into --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import scattered_cache, stored
from inferfleet.worker.kernels.paged_attention import (
    FP8_DTYPE,
    fill_tile_map,
    paged_attention,
    tile_map_entries,
)
from microbench import graph_of, time_ms

H, KVH, D, PAGE = 32, 8, 128, 16


# launches of one variant captured in one CUDA graph: replays time the GPU, not Triton's Python launcher
GRAPH_LAUNCHES = 10


def concurrently(first, second, side: torch.cuda.Stream) -> None:
    """first() on the current stream and second() on `side`, joined after (in a CUDA graph: two
    branches)."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    first()
    with torch.cuda.stream(side):
        second()
    main.wait_stream(side)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--decodes", default="256,128,32")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--cached", type=int, default=512)
    ap.add_argument(
        "--rounds", type=int, default=5, help="timings of every variant, interleaved; median kept"
    )
    ap.add_argument(
        "--cache",
        choices=("bf16", "fp8"),
        default="bf16",
        help="KV cache dtype; fp8: e4m3 with scales (--map-tunings then set the map_*_fp8 keys)",
    )
    ap.add_argument(
        "--map-tunings",
        default="",
        help="more map launches, BLOCK_N:WARPS:STAGES[:BLOCK_Q] each (paged_attention's map_* tuning; a "
        "BLOCK_Q fills the map with query tiles of that many tokens), e.g. 128:4:2,64:4:3:4",
    )
    args = ap.parse_args()
    map_tunings = [tuple(int(v) for v in t.split(":")) for t in args.map_tunings.split(",") if t]
    kv_dtype = FP8_DTYPE if args.cache == "fp8" else torch.bfloat16
    kv_scale = (0.5, 0.25) if args.cache == "fp8" else (1.0, 1.0)  # scales other than 1 take their paths
    fp8 = "_fp8" if args.cache == "fp8" else ""  # the fp8 cache's own map_* tuning keys
    rows = []
    side = torch.cuda.Stream()  # "map split, two streams": the prefill-tile launch's branch
    for b in (int(x) for x in args.decodes.split(",")):
        rng = random.Random(b)
        qlens = [1] * b + [args.chunk]
        ctx = [rng.randint(100, 2048) for _ in range(b)] + [args.cached + args.chunk]
        g = torch.Generator(device="cuda").manual_seed(b)
        kc, vc, bt = scattered_cache(ctx, kv_dtype, g, spare_columns=16)
        kc, vc = stored(kc, "head"), stored(vc, "head")
        t = sum(qlens)
        q = torch.randn(t, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32, device="cuda")
        sl = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        q_np, ctx_np = np.array(qlens), np.array(ctx)
        entries = tile_map_entries(t, len(ctx), H // KVH)
        full = np.zeros((entries, 2), dtype=np.int32)
        fill_tile_map(q_np, ctx_np, H // KVH, full)
        dec = np.zeros((len(ctx), 2), dtype=np.int32)
        fill_tile_map(np.where(q_np == 1, 1, 0), ctx_np, H // KVH, dec, decode=True)  # one-token sequences
        pre = np.zeros((entries, 2), dtype=np.int32)
        fill_tile_map(np.where(q_np > 1, q_np, 0), ctx_np, H // KVH, pre)
        maps = {k: torch.from_numpy(v).cuda() for k, v in (("full", full), ("dec", dec), ("pre", pre))}
        scale = D**-0.5

        def launch(
            out: torch.Tensor, mq: int, tile_map: torch.Tensor | None, tuning: dict | None = None
        ) -> None:
            paged_attention(
                q, kc, vc, out, qsl, sl, bt, mq, scale, tile_map=tile_map, tuning=tuning, kv_scale=kv_scale
            )

        variants = {
            "grid": lambda o: launch(o, args.chunk, None),
            "map": lambda o: launch(o, args.chunk, maps["full"]),
            "map split": lambda o: (launch(o, 1, maps["dec"]), launch(o, args.chunk, maps["pre"])),
            "map split, two streams": lambda o: concurrently(
                lambda: launch(o, 1, maps["dec"]), lambda: launch(o, args.chunk, maps["pre"]), side
            ),
        }
        for bn, w, st, *bq in map_tunings:
            tuning = {"map_block_n" + fp8: bn, "map_num_warps" + fp8: w, "map_num_stages" + fp8: st}
            name, tiles = f"map bn{bn} w{w} s{st}", maps["full"]
            if bq:
                tuning["map_block_q"] = bq[0]
                name += f" q{bq[0]}"
                host = np.zeros((tile_map_entries(t, len(ctx), H // KVH, block_q=bq[0]), 2), dtype=np.int32)
                fill_tile_map(q_np, ctx_np, H // KVH, host, block_q=bq[0])
                tiles = torch.from_numpy(host).cuda()
            variants[name] = lambda o, tuning=tuning, tiles=tiles: launch(o, args.chunk, tiles, tuning)
        ref = torch.zeros_like(q)
        variants["grid"](ref)
        row = {
            "decodes": b,
            "chunk": args.chunk,
            "cached": args.cached,
            "kv_mb": 4 * KVH * D * sum(ctx) / 2**20,
        }
        # the decodes alone, decode tiles, one grid launch
        qd, outd = q[:b], torch.zeros_like(q[:b])
        qsld = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        variants["decodes alone"] = lambda o: paged_attention(
            qd, kc, vc, outd, qsld, sl[:b], bt[:b], 1, scale, kv_scale=kv_scale
        )
        graphs = {}
        for name, fn in variants.items():
            out = torch.zeros_like(q)
            try:
                fn(out)
            except Exception as e:  # a tuning Triton cannot build (shared memory, registers)
                print(name, "error:", type(e).__name__, str(e)[:120], flush=True)
                row[f"{name} us"] = float("nan")
                continue
            if name != "decodes alone":
                row[f"{name} max diff"] = float((out.float() - ref.float()).abs().max())
            graphs[name] = graph_of(lambda fn=fn, out=out: fn(out), GRAPH_LAUNCHES)
        # each round times every variant once, in turn, so that drifts of the clocks fall on all alike
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                times[name].append(1000 * time_ms(graph.replay, reps=10, warmup=1) / GRAPH_LAUNCHES)
        for name, ts in times.items():
            row[f"{name} us"] = statistics.median(ts)
            row[f"{name} us rounds"] = ts
        rows.append(row)
        print(json.dumps(row))
    res = {
        "device": torch.cuda.get_device_name(),
        "cache": args.cache,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mixed_attention_bench.json").write_text(json.dumps(res, indent=1))
    names = [k.removesuffix(" us") for k in rows[0] if k.endswith(" us")]
    print(
        "us per layer (median of rounds), one column per step; KV MB: "
        + ", ".join(f"{r['kv_mb']:.0f}" for r in rows)
    )
    print(f"{'variant':24s} " + " ".join(f"{str(r['decodes']) + ' dec':>9}" for r in rows))
    for name in names:
        print(f"{name:24s} " + " ".join(f"{r[name + ' us']:9.1f}" for r in rows))


if __name__ == "__main__":
    main()
