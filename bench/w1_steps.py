"""The steps W1 runs as, under gpu_bench.py's engine settings: how many decodes and prompt tokens each
step holds, and how much KV its attention reads, by kind of step.

    python bench/w1_steps.py --out DIR [--model DIR] [--device cpu] [--kv-tokens 442992]

The schedule does not depend on the model's weights or speed, only on the requests, the settings
and the KV capacity, so this runs the real engine on a tiny random checkpoint (made here unless
--model is given; prompt ids taken modulo its vocabulary) with the KV capacity the H100 run had
(442,992 token slots for Llama-3.1-8B at gpu_memory_utilization 0.9). Steps are split into decode-only
steps (cuda_graphs.DecodeGraphs) and steps with prompt chunks (MixedGraphs up to 1,024 tokens,
eager above), and the latter by their number of decodes; for each class: steps, decode rows, prompt
tokens, and the KV a Llama-3.1-8B would read there (context tokens x 131,072 bytes). Prints a table;
writes DIR/w1_steps.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inferfleet.worker import EngineConfig, LLMEngine, SamplingParams
from inferfleet.worker.llm import OFFLINE_DECODE_STEP_TOKENS
from workloads import w1

KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # Llama-3.1-8B: layers x KV heads x head dim x (K, V) x bf16
BUCKETS = (0, 16, 32, 64, 128, 192, 256)  # decodes per step with prompt chunks: (lo, hi] classes


def bucket(decodes: int) -> str:
    for lo, hi in itertools.pairwise(BUCKETS):
        if decodes <= hi:
            return f"prompt + {lo + 1 if lo else 0}-{hi} decodes"
    return f"prompt + >{BUCKETS[-1]} decodes"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-tokens", type=int, default=442_992)
    ap.add_argument("--requests", type=int, default=256, help="W1's first N requests (tests take a few)")
    args = ap.parse_args()
    tmp = None
    model = args.model
    if model is None:
        from inferfleet.worker.tiny import make_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model = str(make_tiny_model(Path(tmp.name) / "tiny", arch="llama"))
    result = run(model, args.device, args.kv_tokens, args.requests)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "w1_steps.json").write_text(json.dumps(result))
    print_table(result)
    if tmp is not None:
        tmp.cleanup()


def run(model: str, device: str, kv_tokens: int, requests: int = 256) -> dict:
    """W1 (its first `requests`) through an engine on `model`: every step recorded and classed."""
    eng = LLMEngine(
        EngineConfig(
            model=model,
            device=device,
            dtype="float32" if device == "cpu" else "bfloat16",
            max_num_seqs=256,
            max_model_len=4096,
            max_num_batched_tokens=8192,
            num_kv_blocks=kv_tokens // 16,
            admission="longest_first",
            decode_step_tokens=OFFLINE_DECODE_STEP_TOKENS,
        )
    )
    vocab = eng.model_config.vocab_size
    steps: list[dict] = []
    execute = eng.runner.execute

    def recorded(out, *a, **kw):  # type: ignore[no-untyped-def]
        # a decode as the runner counts one (runner.HostBatch.decode_only): one new token that samples
        rows = [
            (
                s.num_new_tokens,
                s.seq.num_computed_tokens + s.num_new_tokens,
                s.num_new_tokens == 1 and s.samples,
            )
            for s in out.scheduled
        ]
        steps.append(
            {
                "decodes": sum(1 for _, _, dec in rows if dec),
                "prompt_tokens": sum(n for n, _, dec in rows if not dec),
                "decode_kv_tokens": sum(ctx for _, ctx, dec in rows if dec),
                "prompt_kv_tokens": sum(ctx for _, ctx, dec in rows if not dec),
            }
        )
        return execute(out, *a, **kw)

    eng.runner.execute = recorded  # type: ignore[method-assign]
    reqs = w1()[:requests]
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        eng.add_request(
            f"w1-{i}",
            params=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True),
            prompt_token_ids=[t % vocab for t in r.prompt],
        )
    eng.generate_all([f"w1-{i}" for i in range(len(reqs))])
    seconds = time.perf_counter() - t0
    classes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for st in steps:
        name = "decode only" if st["prompt_tokens"] == 0 else bucket(st["decodes"])
        c = classes[name]
        c["steps"] += 1
        for key in ("decodes", "prompt_tokens", "decode_kv_tokens", "prompt_kv_tokens"):
            c[key] += st[key]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "kv_tokens": kv_tokens,
        "requests": len(reqs),
        "output_tokens": sum(r.max_tokens for r in reqs),
        "seconds": seconds,
        "steps": len(steps),
        "classes": {k: dict(v) for k, v in classes.items()},
        "per_step": steps,
    }


def print_table(result: dict) -> None:
    classes = result["classes"]
    total_kv = sum(c["decode_kv_tokens"] + c["prompt_kv_tokens"] for c in classes.values())
    print(
        f"W1 under gpu_bench's settings: {result['steps']} steps ({result['seconds']:.0f} s on {result['device']})"
    )
    print(f"{'class':28} {'steps':>6} {'decodes':>8} {'prompt tok':>10} {'KV TB (8B)':>10} {'KV share':>8}")
    for name in ["decode only", *(bucket(hi) for hi in BUCKETS[1:]), bucket(BUCKETS[-1] + 1)]:
        c = classes.get(name)
        if not c:
            continue
        kv = c["decode_kv_tokens"] + c["prompt_kv_tokens"]
        print(
            f"{name:28} {c['steps']:6d} {c['decodes']:8d} {c['prompt_tokens']:10d} "
            f"{kv * KV_BYTES_PER_TOKEN / 1e12:10.2f} {kv / total_kv:8.1%}"
        )


if __name__ == "__main__":
    main()
