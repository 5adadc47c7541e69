"""Triton compiles that happen while serving, on a cold cache (a new pod), for the 8B shape.

    python bench/compile_watch.py --out $OUT [--workloads w1,w2_1000] [--scale 0.5] [--kv-cache-dtype fp8]
                                  [--quantization fp8]

Every JIT compile of the process (Triton and Gluon kernels) is timed by wrapping
JITFunction._do_compile, with TRITON_CACHE_DIR pointed at an empty directory unless one is set.
Phases: `startup` (engine construction and warmup: graph capture), `first requests` (four
300-token prompts, as gpu_bench.py runs before timing anything), then each workload. A compile
after startup is a stall a request waits for. Prints, per phase, each kernel's compiles and
seconds, and writes compile_watch.json with every compile's specialization key.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-"))

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from triton.runtime import jit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import generate
from inferfleet.worker import LLM
from workloads import fixed, scaled, w1

PHASE = ["startup"]
COMPILES: list[dict] = []
_do_compile = jit.JITFunction._do_compile


def _timed_compile(self, key, signature, device, constexprs, options, attrs, warmup):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    kernel = _do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
    COMPILES.append(
        {"phase": PHASE[0], "kernel": self.__name__, "seconds": time.perf_counter() - t0, "key": str(key)}
    )
    return kernel


jit.JITFunction._do_compile = _timed_compile  # type: ignore[method-assign]

WORKLOADS = {
    "w1": lambda scale: scaled(w1(), scale),
    "w2_1000": lambda scale: scaled(fixed(1000, 1000, 1000), scale / 4),
    "w2_128": lambda scale: scaled(fixed(128, 128, 1000), scale),
    "w2_2048": lambda scale: scaled(fixed(2048, 128, 500), scale),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--workloads", default="w1,w2_1000")
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    ap.add_argument("--quantization", default="none")
    args = ap.parse_args()
    ensure_llama8b_checkpoint(args.model_dir)
    llm = LLM(
        model=args.model_dir, dtype="bfloat16", device="cuda", max_num_seqs=256, max_model_len=4096,
        max_num_batched_tokens=8192, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
    )  # fmt: skip
    llm.engine.warmup()
    PHASE[0] = "first requests"
    generate(llm, fixed(300, 4, 8, seed=9))
    runs = {}
    for name in args.workloads.split(","):
        PHASE[0] = name
        runs[name] = generate(llm, WORKLOADS[name](args.scale), temperature=0.6 if name == "w1" else 0.0)
    by_phase: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in COMPILES:
        by_phase[c["phase"]][c["kernel"]].append(c["seconds"])
    print(
        f"\n=== Triton compiles by phase ({torch.cuda.get_device_name()}, cache {os.environ['TRITON_CACHE_DIR']})"
    )
    for phase, kernels in by_phase.items():
        total = sum(sum(v) for v in kernels.values())
        print(f"{phase}: {sum(len(v) for v in kernels.values())} compiles, {total:.1f} s")
        for k, v in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {k:40s} {len(v):3d}  {sum(v):6.2f} s")
    for name, r in runs.items():
        print(f"{name}: {r['output_tok_s']:.0f} out tok/s ({r['seconds']:.1f} s)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "compile_watch.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "compiles": COMPILES, "runs": runs}, indent=1)
    )
    after = [c for c in COMPILES if c["phase"] != "startup"]
    print(f"compiles after startup: {len(after)}, {sum(c['seconds'] for c in after):.1f} s")


if __name__ == "__main__":
    main()
