"""`inferfleet-worker`: serve a model, or make a tiny random checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    from .tiny import ARCHES

    p = sub.add_parser(
        "make-tiny-model", help="write a small random-weight checkpoint in Hugging Face layout"
    )
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHES, default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards (index file when > 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="offline generation for a few prompts (LLM.generate)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferfleet-worker")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_make_tiny(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.cmd == "make-tiny-model":
        from .tiny import make_tiny_model

        out = make_tiny_model(
            args.out_dir, arch=args.arch, seed=args.seed, shards=args.shards, dtype=args.dtype
        )
        print(out)
        return 0
    if args.cmd == "generate":
        from .errors import InferfleetError
        from .llm import LLM
        from .sampling_params import SamplingParams

        try:
            llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
            for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
                print(f"{prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
        except InferfleetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
