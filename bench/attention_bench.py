"""Paged-attention decode on the H100: KV bandwidth per cache dtype and launch choice (issue 4, 6).

    python bench/attention_bench.py --out $OUT [--quick]
    python bench/attention_bench.py --out $OUT --batch1

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens),
blocks scattered at random through the pool as a long-running engine leaves them. Cases:

- W2 1000/1000's decode batch: 256 sequences, contexts uniform in [1000, 2000];
- W1-like: 256 sequences, contexts uniform in [100, 2048];
- 32 sequences at 1000-2000 tokens (split-KV as the decode graphs choose it).

--batch1 times batch-1 decode instead, as a step sees it: a few microseconds per call are below
what do_bench resolves alone, so 32 dependent layers (layer i + 1's q is layer i's output) run in
one CUDA graph, each the call TritonAttentionBackend makes (rotary and KV write fused in, PDL on
Hopper, the merge launch when split) over its own cache pages. An L2 flush before each replay
(timed alone and subtracted) leaves every layer's KV in HBM, as the weights streamed between two
layers of a real step do; "warm" in the JSON is the same without it. Contexts x splits, each
split count checked against one split first; the table gives microseconds per layer. Since the
ninth session the merge lets the launch after it start at once (kernels/pdl.py); in this chain
that is the next layer's attention, which then loads its first KV tile while the previous
attention still runs (in a step it is the output projection), so split timings from before and
after that change do not compare.

Every launch variant (paged_attention's `tuning` keys) is checked against the default launch on
the same inputs before it is timed (max abs difference printed; a variant that disagrees is
reported, not timed). GB/s counts the K and V bytes each case must read. Prints a table last and
writes attention_bench.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inferfleet.worker.config import RopeConfig
from inferfleet.worker.cuda_graphs import decode_splits
from inferfleet.worker.kernels import pdl
from inferfleet.worker.kernels.paged_attention import (
    DEFAULT_TUNING,
    NewKV,
    fill_tile_map,
    paged_attention,
    split_workspace,
)
from inferfleet.worker.layers.rotary import RotaryEmbedding
from microbench import graph_of, time_ms

H, KVH, D, PAGE = 32, 8, 128, 16

# launch variants against DEFAULT_TUNING; "layout" is the bench's own key, the storage order of the
# K and V caches (both viewed [block, slot, kv head, channel]): "slot" [block, slot, kv head,
# channel], "head" [block, kv head, slot, channel] (layers/attention.alloc_kv_cache's)
VARIANTS: list[dict[str, Any]] = [
    {"layout": "head"},
    {"layout": "slot"},
    {"layout": "head", "heads_fast": False},
    {"layout": "head", "fp8_f16_dots": False},
    {"layout": "head", "decode_block_n": 128, "num_stages": 3},
    {"layout": "head", "decode_block_n_fp8": 64, "num_stages_fp8": 2},
    {"layout": "head", "num_warps": 2},
    {"layout": "head", "fp8_widen_v": False},
    {"layout": "head", "num_stages_fp8": 2},
    {"layout": "head", "num_stages_fp8": 4},
    {"layout": "head", "decode_block_n_fp8": 64, "num_stages_fp8": 3},
    {"layout": "head", "num_warps": 8},
    {"layout": "head", "decode_block_n_fp8": 64, "num_stages_fp8": 2},
    {"layout": "head", "decode_block_n_fp8": 64, "num_stages_fp8": 5},
    {"layout": "head", "decode_block_n": 128, "num_stages": 2},
    {"layout": "head", "tile_map": "batch"},
    {"layout": "head", "tile_map": "longest"},
]


def scattered_cache(
    ctx: list[int], kv_dtype: torch.dtype, g: torch.Generator, spare_columns: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K and V caches [pages, PAGE, KVH, D] (stored slot-major) holding exactly the pages of
    sequences with contexts `ctx`, and block tables [len(ctx), most pages + spare_columns] that give
    each sequence its pages in a random order through the pool (drawn from `g`)."""
    nblk_each = [-(-c // PAGE) for c in ctx]
    total = sum(nblk_each)
    kc = torch.randn(total, PAGE, KVH, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    vc = torch.randn(total, PAGE, KVH, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    perm = torch.randperm(total, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(len(ctx), max(nblk_each) + spare_columns, dtype=torch.int32, device="cuda")
    off = 0
    for i, n in enumerate(nblk_each):
        bt[i, :n] = perm[off : off + n]
        off += n
    return kc, vc, bt


def make_case(b: int, lo: int, hi: int, kv_dtype: torch.dtype, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ctx = [rng.randint(lo, hi) for _ in range(b)]
    g = torch.Generator(device="cuda").manual_seed(seed)
    kc, vc, bt = scattered_cache(ctx, kv_dtype, g)
    q = torch.randn(b, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return {
        "layouts": {},
        "q": q,
        "kc": kc,
        "vc": vc,
        "bt": bt,
        "qsl": torch.arange(b + 1, device="cuda", dtype=torch.int32),
        "sl": torch.tensor(ctx, device="cuda", dtype=torch.int32),
        "bytes": 2 * sum(ctx) * KVH * D * kc.element_size(),
    }


STORAGE = {"slot": (0, 1, 2, 3), "head": (0, 2, 1, 3)}


def stored(cache: torch.Tensor, order: str) -> torch.Tensor:
    """The same values in another storage order, viewed [block, slot, kv head, channel] again."""
    perm = STORAGE[order]
    back = [perm.index(i) for i in range(4)]
    return cache.permute(*perm).contiguous().permute(*back)


def decode_map(case: dict[str, Any], order: str) -> torch.Tensor:
    """A decode launch's tile map (one program per KV head and sequence): the batch's own order, or
    longest context first (fill_tile_map, as cuda_graphs.MixedGraphs fills it)."""
    ctx = case["sl"].cpu().numpy()
    tiles = np.zeros((len(ctx), 2), dtype=np.int32)
    if order == "batch":
        tiles[:, 0] = np.arange(len(ctx))
    else:
        fill_tile_map(np.ones_like(ctx), ctx, H // KVH, tiles, decode=True)
    return torch.from_numpy(tiles).cuda()


def run(case: dict[str, Any], splits: int, variant: dict[str, Any]) -> torch.Tensor:
    tuning = {k: v for k, v in variant.items() if k not in ("layout", "tile_map")}
    tile_map = None
    if "tile_map" in variant:
        assert splits == 1, "a tile map takes no splits"
        tile_map = case.setdefault("maps", {}).get(variant["tile_map"])
        if tile_map is None:
            tile_map = case["maps"][variant["tile_map"]] = decode_map(case, variant["tile_map"])
    order = variant.get("layout", "head")
    if order not in case["layouts"]:
        case["layouts"] = {order: (stored(case["kc"], order), stored(case["vc"], order))}  # one at a time
    kc, vc = case["layouts"][order]
    out = torch.empty_like(case["q"])
    paged_attention(
        case["q"], kc, vc, out, case["qsl"], case["sl"], case["bt"], 1, D**-0.5,
        num_splits=splits, tuning=tuning, tile_map=tile_map,
    )  # fmt: skip
    return out


LAYERS = 32
B1_CONTEXTS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
B1_SPLITS = (1, 2, 4, 8, 16)


def batch1_layers(ctx: int, seed: int) -> dict[str, Any]:
    """LAYERS layers' inputs for one sequence of `ctx` tokens (the last one new): the QKV
    projection's output, rotary tables, and for each layer its own scattered pages (row i of the
    block tables), stored head-major as alloc_kv_cache does."""
    case = make_case(LAYERS, ctx, ctx, torch.bfloat16, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(1, (H + 2 * KVH) * D, device="cuda", dtype=torch.bfloat16, generator=g)
    rot = RotaryEmbedding(RopeConfig(theta=500000.0), D, ctx).to("cuda")
    bt = case["bt"]
    # NewKV's fields but the slot: the new token's K and V (not rotated yet), its position, cos/sin
    new = (qkv[:, H * D : (H + KVH) * D].view(1, KVH, D), qkv[:, (H + KVH) * D :].view(1, KVH, D),
           torch.full((1,), ctx - 1, device="cuda"), rot.cos, rot.sin)  # fmt: skip
    return {
        "q0": qkv[:, : H * D].view(1, H, D),
        "kc": stored(case["kc"], "head"),
        "vc": stored(case["vc"], "head"),
        "bt": bt,
        "qsl": case["qsl"][:2],
        "sl": case["sl"],
        "new": new,
        "slots": bt[:, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE,  # each layer's new slot
        "outs": torch.empty(LAYERS, 1, H, D, device="cuda", dtype=torch.bfloat16),
    }


def batch1_graph(c: dict[str, Any], splits: int) -> torch.cuda.CUDAGraph:
    """The chain of LAYERS dependent attention calls in one CUDA graph (compiled before capture)."""
    ws = split_workspace(1, H, D, splits, torch.device("cuda")) if splits > 1 else None

    def chain() -> None:
        q = c["q0"]
        for i in range(LAYERS):
            new_kv = NewKV(*c["new"], c["slots"][i : i + 1])
            paged_attention(q, c["kc"], c["vc"], c["outs"][i], c["qsl"], c["sl"][i : i + 1], c["bt"][i : i + 1],
                            1, D**-0.5, num_splits=splits, workspace=ws, new_kv=new_kv)  # fmt: skip
            q = c["outs"][i]

    return graph_of(chain)


def batch1_main(out_dir: str, sms: int) -> None:
    flush_buf = torch.ones(64 * 2**20, device="cuda")  # 256 MB, 5x the H100's 50 MB L2

    def flush() -> None:
        flush_buf.sum()  # reads: the lines it leaves in L2 are clean

    rows: list[dict[str, Any]] = []
    for ctx in B1_CONTEXTS:
        c = batch1_layers(ctx, seed=ctx)
        ref = None
        for splits in B1_SPLITS:
            g = batch1_graph(c, splits)
            g.replay()
            out = c["outs"].clone()
            ref = out if ref is None else ref
            row: dict[str, Any] = {"ctx": ctx, "splits": splits}
            row["max_abs_diff_vs_1_split"] = (out.float() - ref.float()).abs().max().item()
            # bf16 rounding of one layer's output moves the next layer's q: a few bf16 steps (2^-8
            # relative) over the chain, against errors of order 1 from a wrong split or merge
            if row["max_abs_diff_vs_1_split"] > 3e-2 * ref.float().abs().max().item():
                row["error"] = "disagrees with one split"
            else:
                row["us_per_layer_warm"] = time_ms(g.replay, reps=50, warmup=5) * 1e3 / LAYERS
                both = time_ms(lambda: (flush(), g.replay()), reps=50, warmup=5)
                row["us_per_layer"] = (both - time_ms(flush, reps=50, warmup=5)) * 1e3 / LAYERS
            rows.append(row)
        del c
        torch.cuda.empty_cache()
    head = (
        f"{'ctx':>6s} "
        + " ".join(f"{'s=' + str(s):>7s}" for s in B1_SPLITS)
        + f" {'best':>5s} {'engine':>6s} {'diff':>8s}"
    )
    table = [head]
    for ctx in B1_CONTEXTS:
        rs = [r for r in rows if r["ctx"] == ctx]
        timed = [r for r in rs if "us_per_layer" in r]
        best = min(timed, key=lambda r: r["us_per_layer"])["splits"] if timed else "-"
        cells = " ".join(f"{r['us_per_layer']:7.2f}" if "us_per_layer" in r else f"{'x':>7s}" for r in rs)
        diff = max(r["max_abs_diff_vs_1_split"] for r in rs)
        table.append(f"{ctx:6d} {cells} {best!s:>5s} {decode_splits(1, KVH, sms):6d} {diff:8.1e}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "mode": "batch1", "layers": LAYERS, "pdl": pdl.enabled(),
              "rows": rows, "table": table}  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "attention_bench.json").write_text(json.dumps(result, indent=2))
    print(f"\n=== batch-1 decode attention, {LAYERS} dependent layers in one CUDA graph, us per layer (KV in "
          f"HBM), PDL {'on' if pdl.enabled() else 'off'}, {result['device']}, {result['date']}")  # fmt: skip
    print("\n".join(table))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="the first three variants only")
    ap.add_argument("--cases", default="0,1,2", help="indices of the cases to run")
    ap.add_argument("--variants", help="indices into VARIANTS to run (default: all, or --quick's)")
    ap.add_argument("--batch1", action="store_true", help="only batch 1: 32 layers, contexts x splits")
    args = ap.parse_args()
    pdl.set_enabled(torch.cuda.get_device_capability() >= (9, 0))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.batch1:
        return batch1_main(args.out, sms)
    cases = [("w2-decode b256 ctx1000-2000", 256, 1000, 2000), ("w1-like b256 ctx100-2048", 256, 100, 2048),
             ("b32 ctx1000-2000", 32, 1000, 2000)]  # fmt: skip
    variants = VARIANTS[:3] if args.quick else VARIANTS
    if args.variants:
        variants = [VARIANTS[int(i)] for i in args.variants.split(",")]
    rows: list[dict[str, Any]] = []
    for name, b, lo, hi in [cases[int(i)] for i in args.cases.split(",")]:
        splits = decode_splits(b, KVH, sms)
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            case = make_case(b, lo, hi, kv_dtype, seed=b + hi)
            ref = run(case, splits, {"layout": "head"})
            for tuning in variants:
                row = {"case": name, "kv": str(kv_dtype).removeprefix("torch."), "splits": splits,
                       "tuning": {**DEFAULT_TUNING, **tuning}, "changed": tuning}  # fmt: skip
                out = run(case, splits, tuning)
                row["max_abs_diff_vs_default"] = (out.float() - ref.float()).abs().max().item()
                if row["max_abs_diff_vs_default"] > 2e-2:
                    row["error"] = "disagrees with the default launch"
                else:
                    us = triton.testing.do_bench(lambda c=case, t=tuning: run(c, splits, t), warmup=25, rep=200,
                                                 return_mode="median") * 1e3  # fmt: skip
                    row["us"] = us
                    row["gb_s"] = case["bytes"] / us / 1e3
                rows.append(row)
            del case
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "attention_bench.json").write_text(json.dumps(result, indent=2))
    print(f"\n=== paged-attention decode, {result['device']}, {result['date']}")
    print(f"{'case':28s} {'kv':14s} {'variant':60s} {'us':>9s} {'GB/s':>7s} {'diff':>8s}")
    for r in rows:
        us = f"{r['us']:9.1f}" if "us" in r else f"{'-':>9s}"
        gb = f"{r['gb_s']:7.0f}" if "gb_s" in r else r.get("error", "")
        print(f"{r['case']:28s} {r['kv']:14s} {json.dumps(r['changed']):60s} {us} {gb:>7s} "
              f"{r['max_abs_diff_vs_default']:8.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
