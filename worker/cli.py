"""`inferfleet-worker`: serve a model, make a tiny random checkpoint, or quantize one (GPTQ)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any, TypeVar

from .config import DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig  # config imports no torch

API_KEY_ENV = "INFERFLEET_API_KEY"
KV_CACHE_DTYPE_HELP = (
    "KV cache element type: auto = the model dtype; fp8 = float8_e4m3fn with the checkpoint's per-layer "
    "k/v scales (kv_cache_scheme) or 1.0, values clamped to +-448 x scale (half the KV bytes, twice the "
    "blocks; CUDA needs compute capability >= 8.9)"
)


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    from .tiny import ARCHES

    p = sub.add_parser(
        "make-tiny-model", help="write a small random-weight checkpoint in Hugging Face layout"
    )
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHES, default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards (index file when > 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="offline generation for a few prompts (LLM.generate)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a GPTQ (AutoGPTQ layout) or FP8 / INT8 (compressed-tensors) checkpoint from a plain one "
        "(docs/quantization.md)",
    )
    p.add_argument(
        "--method",
        choices=("gptq", "rtn", "fp8", "int8", "kv"),
        default="gptq",
        help="rtn: GPTQ layout, round to nearest, no data; fp8 / int8: 8-bit codes per channel "
        "(compressed-tensors FP8_DYNAMIC / W8A8 INT8); kv: the weights as they are, with FP8 KV cache "
        "scales from --calibration (a compressed-tensors kv_cache_scheme)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="text file of calibration data (gptq; fp8 / int8 --kv-cache-scales)",
    )
    p.add_argument(
        "--kv-cache-scales",
        action="store_true",
        help="fp8 / int8: also write per-layer FP8 KV cache scales (kv_cache_scheme; max |K|, |V| on the "
        "calibration text / 448), applied by --kv-cache-dtype fp8",
    )
    p.add_argument("--model", required=True, help="input Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1: one per row")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group)")
    p.add_argument(
        "--lm-head",
        action="store_true",
        help="quantize lm_head too (GPTQModel's lm_head=True; untied models)",
    )
    p.add_argument("--damp", type=float, default=0.01, help="dampening, a fraction of the mean diag(H)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _quantize(args: argparse.Namespace) -> int:
    from .errors import InferfleetError
    from .quant.calibrate import QuantizeSpec, quantize_checkpoint

    try:
        spec = _from_args(QuantizeSpec, args, sym=not args.asym)
        text = None
        if args.calibration is not None:
            try:
                with open(args.calibration, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                print(f"error: cannot read --calibration: {e}", file=sys.stderr)
                return 2
        reports = quantize_checkpoint(args.model, args.out, spec, calibration_text=text, device=args.device)
    except InferfleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        gain = 1 - r.gptq_error / r.rtn_error if r.rtn_error > 0 else 0.0
        print(f"{r.name:44s} gptq {r.gptq_error:11.4e}  rtn {r.rtn_error:11.4e}  ({gain:+.1%} less error)")
    print(args.out)
    return 0


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _seconds(v: str) -> float:
    x = float(v)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {v}")
    return x


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (see docs/server.md)")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (it is logged)")
    p.add_argument("--served-model-name", default=None, help="the model id of the API (default: dir name)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--max-num-seqs", type=_positive_int, default=256)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None)
    p.add_argument("--block-size", type=_positive_int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-blocks", type=_positive_int, default=None)
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="with --quantization fp8 or int8 of a plain checkpoint: quantize lm_head at load too "
        "(untied models)",
    )
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: do not capture CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument(
        "--drain-timeout", type=_seconds, default=30.0, help="on SIGTERM, seconds in-flight requests may run"
    )
    p.add_argument("--max-queued-requests", type=_positive_int, default=1024)
    p.add_argument(
        "--max-queued-tokens", type=_positive_int, default=None, help="default: 8 x max-model-len, >= 2**20"
    )
    p.add_argument("--max-body-bytes", type=_positive_int, default=4 * 2**20)
    p.add_argument(
        "--debug-load-delay", type=_seconds, default=0.0, help="testing only: sleep before loading weights"
    )


_T = TypeVar("_T")


def _from_args(cls: type[_T], args: argparse.Namespace, **overrides: Any) -> _T:
    """`cls(...)` from the flags named like its fields (--max-num-seqs -> max_num_seqs); fields
    without a flag keep their defaults; `overrides` set fields whose flag differs or falls back."""
    kw = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and hasattr(args, f.name)
    }
    return cls(**(kw | overrides))


def _serve(args: argparse.Namespace, started_at: float) -> int:
    from .errors import InferfleetError
    from .server import ServerConfig, run

    try:
        engine_config = _from_args(
            EngineConfig, args, enable_prefix_caching=not args.no_enable_prefix_caching
        )
    except InferfleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = _from_args(ServerConfig, args, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    return run(engine_config, config, started_at=started_at)


def main(argv: list[str] | None = None) -> int:
    started_at = time.perf_counter()
    # No abbreviated flags: the operator passes extraArgs through after its own managed flags and
    # refuses those by their full names; "--max-model=99" must not pass as --max-model-len.
    parser = argparse.ArgumentParser(prog="inferfleet-worker", allow_abbrev=False)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(
        dest="cmd", required=True, parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    )
    _add_make_tiny(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_quantize(sub)
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
    if args.cmd == "serve":
        return _serve(args, started_at)
    if args.cmd == "quantize":
        return _quantize(args)
    if args.cmd == "generate":
        from .errors import InferfleetError
        from .llm import LLM
        from .sampling_params import SamplingParams

        try:
            llm = LLM(
                model=args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=args.kv_cache_dtype
            )
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
