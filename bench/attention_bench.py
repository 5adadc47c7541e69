"""Paged-attention decode on the H100: KV bandwidth per cache dtype and launch choice (issue 4, 6).

    python bench/attention_bench.py --out $OUT [--quick]

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens),
blocks scattered at random through the pool as a long-running engine leaves them. Cases:

- W2 1000/1000's decode batch: 256 sequences, contexts uniform in [1000, 2000];
- W1-like: 256 sequences, contexts uniform in [100, 2048];
- 32 sequences at 1000-2000 tokens (split-KV as the decode graphs choose it).

(Batch 1 is not timed here: a few microseconds per call are below what do_bench resolves; W3
measures it end to end.)

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

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inferfleet.worker.cuda_graphs import decode_splits
from inferfleet.worker.kernels import pdl
from inferfleet.worker.kernels.paged_attention import DEFAULT_TUNING, paged_attention

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
]


def make_case(b: int, lo: int, hi: int, kv_dtype: torch.dtype, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ctx = [rng.randint(lo, hi) for _ in range(b)]
    nblk_each = [-(-c // PAGE) for c in ctx]
    total = sum(nblk_each)
    width = max(nblk_each)
    g = torch.Generator(device="cuda").manual_seed(seed)
    kc = torch.randn(total, PAGE, KVH, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    vc = torch.randn(total, PAGE, KVH, D, device="cuda", dtype=torch.bfloat16, generator=g).to(kv_dtype)
    perm = torch.randperm(total, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(b, width, dtype=torch.int32, device="cuda")
    off = 0
    for i, n in enumerate(nblk_each):
        bt[i, :n] = perm[off : off + n]
        off += n
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


def run(case: dict[str, Any], splits: int, variant: dict[str, Any]) -> torch.Tensor:
    tuning = {k: v for k, v in variant.items() if k != "layout"}
    order = variant.get("layout", "head")
    if order not in case["layouts"]:
        case["layouts"] = {order: (stored(case["kc"], order), stored(case["vc"], order))}  # one at a time
    kc, vc = case["layouts"][order]
    out = torch.empty_like(case["q"])
    paged_attention(
        case["q"], kc, vc, out, case["qsl"], case["sl"], case["bt"], 1, D**-0.5,
        num_splits=splits, tuning=tuning,
    )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="the first three variants only")
    ap.add_argument("--cases", default="0,1,2", help="indices of the cases to run")
    args = ap.parse_args()
    pdl.set_enabled(torch.cuda.get_device_capability() >= (9, 0))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [("w2-decode b256 ctx1000-2000", 256, 1000, 2000), ("w1-like b256 ctx100-2048", 256, 100, 2048),
             ("b32 ctx1000-2000", 32, 1000, 2000)]  # fmt: skip
    variants = VARIANTS[:3] if args.quick else VARIANTS
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
