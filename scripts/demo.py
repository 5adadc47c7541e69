"""`make demo`: make a tiny random checkpoint and generate text with it through LLM.generate.

The weights are random, so the text is gibberish; what the demo shows is the whole path working:
checkpoint layout, tokenizer, chat template, paged KV cache, continuous batching, detokenization.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".demo", help="where the tiny checkpoint goes")
    ap.add_argument("--arch", default="llama")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from inferfleet.worker import LLM, SamplingParams
    from inferfleet.worker.tiny import make_tiny_model

    model_dir = make_tiny_model(Path(args.dir) / f"tiny-{args.arch}", arch=args.arch, seed=0)
    print(f"== tiny {args.arch} checkpoint in {model_dir}")
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32")
    prompts = [
        "An inference fleet turns requests into tokens.",
        "The scheduler admits new requests while",
        "Hello!",
    ]
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about GPUs."}])
    t0 = time.perf_counter()
    outs = llm.generate(prompts + [chat], SamplingParams(max_tokens=24, temperature=1.0))
    dt = time.perf_counter() - t0
    for p, o in zip([*prompts, "<chat: Write a haiku about GPUs.>"], outs):
        print(f"\n>>> {p}\n{o.text!r}\n    [{len(o.token_ids)} tokens, finish_reason={o.finish_reason}]")
    n = sum(len(o.token_ids) for o in outs)
    print(f"\n== {n} tokens for {len(outs)} requests in {dt:.2f}s (one continuous batch, CPU)")


if __name__ == "__main__":
    main()
