"""Attention of a step with a prefill chunk beside decodes, as W1's offline schedule builds them.

    python bench/mixed_attention_bench.py --out $OUT

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens, bf16
cache stored head-major), pages scattered at random. A step: `--decodes` sequences with contexts
uniform in [100, 2048] (W1-like) and one prompt chunk of `--chunk` tokens after `--cached`
tokens of its own. One layer's attention launches, timed (median of CUDA-event timings, each case's
KV far larger than L2), each checked against the first:

- grid: one launch over every sequence's query tiles up to the longest chunk (prefill tiles for
  the decodes too), as eager steps launch it;
- map: one tile-map launch (cuda_graphs.MixedGraphs), prefill tiles for every sequence;
- map split: a decode-tile map over the one-token sequences and a prefill-tile map over the chunk;
- decodes alone: the decode sequences by themselves in decode tiles (a decode-only step's launch).

Prints a table last and writes mixed_attention_bench.json into --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import scattered_cache, stored
from inferfleet.worker.kernels.paged_attention import fill_tile_map, paged_attention, tile_map_entries
from microbench import time_ms

H, KVH, D, PAGE = 32, 8, 128, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--decodes", default="256,128,32")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--cached", type=int, default=512)
    args = ap.parse_args()
    rows = []
    for b in (int(x) for x in args.decodes.split(",")):
        rng = random.Random(b)
        qlens = [1] * b + [args.chunk]
        ctx = [rng.randint(100, 2048) for _ in range(b)] + [args.cached + args.chunk]
        g = torch.Generator(device="cuda").manual_seed(b)
        kc, vc, bt = scattered_cache(ctx, torch.bfloat16, g, spare_columns=16)
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

        def launch(out: torch.Tensor, mq: int, tile_map: torch.Tensor | None) -> None:
            paged_attention(q, kc, vc, out, qsl, sl, bt, mq, scale, tile_map=tile_map)

        variants = {
            "grid": lambda o: launch(o, args.chunk, None),
            "map": lambda o: launch(o, args.chunk, maps["full"]),
            "map split": lambda o: (launch(o, 1, maps["dec"]), launch(o, args.chunk, maps["pre"])),
        }
        ref = torch.zeros_like(q)
        variants["grid"](ref)
        row = {
            "decodes": b,
            "chunk": args.chunk,
            "cached": args.cached,
            "kv_mb": 4 * KVH * D * sum(ctx) / 2**20,
        }
        for name, fn in variants.items():
            out = torch.zeros_like(q)
            fn(out)
            row[f"{name} max diff"] = float((out.float() - ref.float()).abs().max())
            row[f"{name} us"] = 1000 * time_ms(lambda fn=fn: fn(out), reps=50)
        # the decodes alone, decode tiles, one grid launch
        qd, outd = q[:b], torch.zeros_like(q[:b])
        qsld = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        row["decodes alone us"] = 1000 * time_ms(
            lambda: paged_attention(qd, kc, vc, outd, qsld, sl[:b], bt[:b], 1, scale), reps=50
        )
        rows.append(row)
        print(json.dumps(row))
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mixed_attention_bench.json").write_text(json.dumps(res, indent=1))
    print(
        f"{'decodes':>8} {'KV MB':>7} {'grid':>8} {'map':>8} {'map split':>10} {'decodes alone':>14}  (us per layer)"
    )
    for r in rows:
        print(
            f"{r['decodes']:8d} {r['kv_mb']:7.0f} {r['grid us']:8.1f} {r['map us']:8.1f} {r['map split us']:10.1f} {r['decodes alone us']:14.1f}"
        )


if __name__ == "__main__":
    main()
