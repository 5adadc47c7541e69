"""Weight precision on one H100: W3 and W1 per precision (bf16, fp8, int8, gptq) on the Llama-3.1-8B
shape, and each precision's error against bf16 on the same checkpoint (issue 6).

    python bench/quant_bench.py --out $OUT [--methods bf16,fp8,int8,gptq] [--only kernels,err,w3,w1,w2]
                                [--kv-cache-dtype auto|fp8]

- the checkpoint is bench/checkpoint.py's random bf16 8B (built if missing, ~25 s);
- fp8 and int8 quantize it at load (per-output-channel scales), streamed one tensor at a time;
- gptq: calibrating GPTQ on an 8B model takes far longer than this run may, so its checkpoint is
  ROUND-TO-NEAREST 4-bit packed into the GPTQ layout (group 128, sym, `inferfleet-worker quantize
  --method rtn`): the speed is GPTQ's (same tensors, same kernels), the error is RTN's;
  gptq-lm-head is the same with lm_head quantized too (`quantize --lm-head`, GPTQModel's
  lm_head=True), from its own checkpoint directory (--gptq-dir + "-lm-head");
- fp8-lm-head: an FP8 compressed-tensors checkpoint written here from the bf16 one (per-channel
  e4m3, the projections and lm_head; `ignore` empty), loaded as it is (--model-dir + "-fp8-lm-head");
- fp8-lm-head-at-load, int8-lm-head-at-load: the bf16 checkpoint with `--quantize-lm-head`
  (lm_head quantized at load like the projections);
- error: relative logits error and top-1 agreement vs bf16 over the last 32 positions of 4 random
  prompts of 160 tokens (160-row prefills: W8A8 for fp8, the M-tiled fused kernels for int8/gptq);
- W3 (batch 1, 128 in / 256 out; the mean interval between tokens 2..256, gpu_bench.decode_latency)
  and W1 (256 requests, U[100, 1024] in/out, T = 0.6) through
  bench/gpu_bench.py's machinery; fp8 also runs W3 with W8A8 for decode (torch._scaled_mm at M = 1)
  and W2 1000/1000 at a quarter of the requests (the batch stays at 250 of 256 slots throughout, so
  the rate is the full workload's; bf16's is in docs/benchmarks.md);
- kernels: each precision's matmul on the 8B projection shapes, block configurations at M = 1 and
  fused kernels vs widen/dequantize + cuBLAS (FP8: W8A16 vs W8A8) at M = 16, 64, 256: the data for
  the switch points FUSED_MAX_M (quant/methods.py, = kernels.MAX_M) and W8A16_MAX_M (quant/fp8.py).

--kv-cache-dtype fp8 gives every engine (bf16 included) and the error measurement's scratch cache
a float8_e4m3fn KV cache (docs/quantization.md, "FP8 KV cache"); the setting is in the JSON.

Prints a table last; writes quant_bench.json into --out. Budget: ~6 minutes on one H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint
from gpu_bench import compile_prefill, decode_latency, generate
from inferfleet.worker import LLM
from inferfleet.worker.quant import fp8 as qfp8
from inferfleet.worker.quant.calibrate import QuantizeSpec, quantize_checkpoint
from inferfleet.worker.quant.evaluate import logits_error, prompt_logits
from microbench import SHAPES
from workloads import fixed, random_prompt, scaled, w1

log = logging.getLogger("quant_bench")
METHODS = (
    "bf16",
    "fp8",
    "int8",
    "gptq",
    "gptq-lm-head",
    "fp8-lm-head",
    "fp8-lm-head-at-load",
    "int8-lm-head-at-load",
)
TARGETS = {"fp8 W3 ms/token": 3.0, "gptq W3 ms/token": 2.2, "fp8 W2 1000/1000 out tok/s": 12000.0}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as held on the GPU (parameters and the quantized layers' buffers)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, b in model.named_buffers():
        if not name.endswith((".cos", ".sin")):
            n += b.numel() * b.element_size()
    return n


def ensure_gptq_rtn(src: str, dst: str, lm_head: bool = False) -> dict[str, Any] | None:
    """The gptq method's checkpoint at `dst` (lm_head quantized too with `lm_head`), made from `src`
    unless there; what making it took."""
    if (Path(dst) / "config.json").exists():
        return None
    t0 = time.perf_counter()
    spec = QuantizeSpec(method="rtn", bits=4, group_size=128, lm_head=lm_head)
    quantize_checkpoint(src, dst, spec, device="cuda")
    torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - t0, "note": "round-to-nearest packed in the GPTQ layout"}


def add_model_args(ap: argparse.ArgumentParser, methods: str) -> None:
    """The checkpoint options every per-precision bench takes."""
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--gptq-dir", default="/tmp/llama8b-gptq-rtn")
    ap.add_argument("--methods", default=methods)


def model_dir_for(method: str, args: argparse.Namespace) -> str:
    dirs = {
        "gptq": args.gptq_dir,
        "gptq-lm-head": args.gptq_dir + "-lm-head",
        "fp8-lm-head": args.model_dir + "-fp8-lm-head",
    }
    return dirs.get(method, args.model_dir)


def ensure_fp8_lm_head(src: str, dst: str) -> dict[str, Any] | None:
    """An FP8 compressed-tensors checkpoint at `dst` with every projection and lm_head in per-channel
    e4m3 (`inferfleet-worker quantize --method fp8 --lm-head`: as llm-compressor writes one whose
    recipe does not ignore lm_head), made from `src` on the GPU unless there; what making it took."""
    if (Path(dst) / "config.json").exists():
        return None
    t0 = time.perf_counter()
    quantize_checkpoint(src, dst, QuantizeSpec(method="fp8", lm_head=True), device="cuda")
    torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - t0, "note": "per-channel e4m3, lm_head included"}


def ensure_checkpoints(methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The GPTQ checkpoints the methods need, made unless there; what making each took."""
    made = {}
    for m in ("gptq", "gptq-lm-head"):
        if m in methods and (info := ensure_gptq_rtn(args.model_dir, model_dir_for(m, args), m != "gptq")):
            made[m] = info
            log.info("%s (rtn) checkpoint: %s", m, info)
    fp8_dir = model_dir_for("fp8-lm-head", args)
    if "fp8-lm-head" in methods and (info := ensure_fp8_lm_head(args.model_dir, fp8_dir)):
        made["fp8-lm-head"] = info
        log.info("fp8-lm-head checkpoint: %s", info)
    return made


def build_llm(method: str, model_dir: str, kv_cache_dtype: str = "auto") -> LLM:
    """The engine every per-precision bench measures (the gptq method's checkpoint is already
    quantized, so it loads with quantization none), warmed up."""
    base = method.removesuffix("-lm-head-at-load")  # --quantize-lm-head on the bf16 checkpoint
    at_load = base != method
    quantization = {"bf16": "none", "fp8": "fp8", "int8": "int8"}.get(base, "none")
    llm = LLM(
        model=model_dir, dtype="bfloat16", device="cuda", max_num_seqs=256, max_model_len=4096,
        max_num_batched_tokens=8192, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        quantize_lm_head=at_load,
    )  # fmt: skip
    llm.engine.warmup()
    return llm


def run_method(method: str, model_dir: str, only: set[str], ref_logits: list[torch.Tensor] | None,
               prompts: list[list[int]], w1_scale: float, w2_scale: float,
               kv_cache_dtype: str = "auto") -> tuple[dict[str, Any], list[torch.Tensor] | None]:  # fmt: skip
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    llm = build_llm(method, model_dir, kv_cache_dtype)
    eng = llm.engine
    res["quantization"] = eng.config.quantization
    res["kv_cache_dtype"] = eng.config.kv_cache_dtype
    res["startup"] = {
        **eng.startup_seconds,
        "construct_and_warmup_s": time.perf_counter() - t0,
        "kv_capacity_tokens": eng.runner.capacity_tokens,
        "weight_gb": weight_bytes(eng.runner.model) / 1e9,
    }
    log.info("%s startup: %s", method, res["startup"])
    compile_prefill(llm)
    logits = None
    if "err" in only:
        logits = prompt_logits(eng.runner.model, prompts, last=32, kv_dtype=eng.runner.kv_dtype)
        if ref_logits is not None:
            res["error_vs_bf16"] = logits_error(ref_logits, logits)
            log.info("%s error: %s", method, res["error_vs_bf16"])
    if "w3" in only:
        res["w3"] = decode_latency(llm)
        log.info("%s w3: %s", method, res["w3"])
        if method == "fp8":
            # decode through W8A8 (_scaled_mm) too: recapture the graphs with the switch at 0
            saved = qfp8.W8A16_MAX_M
            qfp8.W8A16_MAX_M = 0
            try:
                eng.runner.graphs = None
                eng.runner.warmup()
                res["w3_w8a8_decode"] = decode_latency(llm)
            finally:
                qfp8.W8A16_MAX_M = saved
                eng.runner.graphs = None
                eng.runner.warmup()
            log.info("%s w3 (W8A8 decode): %s", method, res["w3_w8a8_decode"])
    if "w1" in only:
        res["w1"] = generate(llm, scaled(w1(), w1_scale), temperature=0.6)
        log.info("%s w1: %s", method, res["w1"])
    if "w2" in only and method == "fp8":  # bf16's W2 1000/1000 is in docs/benchmarks.md (6,831 tok/s)
        res["w2_1000_1000"] = generate(llm, fixed(1000, 1000, max(1, int(1000 * w2_scale))))
        log.info("%s w2 1000/1000: %s", method, res["w2_1000_1000"])
    return res, logits  # the engine goes with this frame; the caller collects it


def kernel_table() -> list[dict[str, Any]]:
    """Microseconds and weight GB/s of each precision's matmul on the 8B projection shapes: block
    configurations at M = 1, then fused kernel vs widen/dequantize + cuBLAS (and FP8 W8A16 vs
    W8A8) at M = 16, 64, 256, where the thresholds in quant/methods.py and quant/fp8.py switch.
    Weights rotate among 3 copies so each call reads DRAM, not L2."""
    import triton
    from inferfleet.worker.kernels.gemv import gemv
    from inferfleet.worker.kernels.gptq_gemm import gptq_dequant, gptq_gemm, gptq_stream
    from inferfleet.worker.kernels.gptq_row4 import gptq_row4
    from inferfleet.worker.quant.gptq import pack_int32
    from inferfleet.worker.quant.int8 import int8_linear_reference

    rows = []
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        i8 = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(3)]
        f8 = [w.to(torch.float8_e4m3fn) for w in bf]
        scale = torch.rand(n, device="cuda")
        g = k // 128
        q4 = [pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4, 1) for _ in range(3)]
        s4 = torch.rand(n, g, device="cuda").half()
        z4 = torch.full((n, g), 8, device="cuda", dtype=torch.uint8)
        gi = (torch.arange(k, device="cuda") // 128).to(torch.int32)
        b4 = 0.5 + 3 / 128  # 4-bit codes plus an fp16 scale and a uint8 zero per 128
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cases: dict[str, tuple[Any, float]] = {
                "bf16 cuBLAS": (lambda j: torch.nn.functional.linear(x, bf[j]), 2.0),
                "int8 fused": (lambda j: gemv(x, i8[j], scale), 1.0),
                "int8 widen+cuBLAS": (lambda j: int8_linear_reference(x, i8[j], scale, None), 1.0),
                "fp8 W8A16 fused": (lambda j: gemv(x, f8[j], scale), 1.0),
                "fp8 W8A8 _scaled_mm": (lambda j: qfp8.fp8_scaled_mm(x, f8[j], scale, None), 1.0),
                "gptq fused": (lambda j: gptq_gemm(x, q4[j], s4, z4, gi, 4, 128), b4),
                "gptq dequant+cuBLAS": (
                    lambda j: torch.nn.functional.linear(x, gptq_dequant(q4[j], s4, z4, gi, 4, 128, torch.bfloat16)),
                    b4,
                ),
            }  # fmt: skip
            if m == 1:
                cases["bf16 gemv"] = (lambda j: gemv(x, bf[j]), 2.0)
                cases["bf16 gemv tensor cores"] = (lambda j: gemv(x, bf[j], fma=False), 2.0)
                cases["fp8 gemv tensor cores"] = (lambda j: gemv(x, f8[j], scale, fma=False), 1.0)
                cases["gptq stream (Triton)"] = (lambda j: gptq_stream(x, q4[j], s4, z4, 4, 128), b4)
                # with its overflow check, as o_proj / down_proj run; qkv, gate/up skip it
                cases["gptq row4 (Gluon)"] = (lambda j: gptq_row4(x, q4[j], s4, z4, 128), b4)
                for bn, bk, sk in ((16, 256, None), (32, 128, None), (16, 128, 1), (64, 128, None)):
                    cases[f"gptq bn{bn} bk{bk} sk{sk or 'auto'}"] = (
                        lambda j, bn=bn, bk=bk, sk=sk: gptq_gemm(x, q4[j], s4, z4, gi, 4, 128, block_n=bn, block_k=bk, split_k=sk),
                        b4,
                    )  # fmt: skip
            for label, (fn, bytes_per_weight) in cases.items():
                it = [0]

                def f(fn: Any = fn) -> None:
                    it[0] = (it[0] + 1) % 3
                    fn(it[0])

                us = triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median") * 1e3
                gbs = n * k * bytes_per_weight / us / 1e3
                rows.append({"layer": name, "m": m, "kernel": label, "us": us, "weight_GB/s": gbs})
                print(f"{name:8s} M={m:<4d} {label:24s} {us:9.1f} us {gbs:7.0f} GB/s", flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, ",".join(METHODS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="kernels,err,w3,w1,w2")
    ap.add_argument("--w1-scale", type=float, default=1.0)
    ap.add_argument("--w2-scale", type=float, default=0.25)
    ap.add_argument(
        "--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="KV cache of every engine built"
    )
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    only = set(args.only.split(","))
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "kv_cache_dtype": args.kv_cache_dtype,
        "methods": {},
    }
    if (made := ensure_llama8b_checkpoint(args.model_dir)) is not None:
        results["checkpoint"] = made
        log.info("checkpoint: %s", made)
    if "kernels" in only:
        results["kernels"] = kernel_table()
    if made := ensure_checkpoints(methods, args):
        results["checkpoints"] = made
    rng = random.Random(11)
    prompts = [random_prompt(rng, 160) for _ in range(4)]
    ref_logits = None
    if "err" in only and methods[0] != "bf16":
        methods = ["bf16", *methods]
    for m in methods:
        res, logits = run_method(
            m,
            model_dir_for(m, args),
            only,
            ref_logits,
            prompts,
            args.w1_scale,
            args.w2_scale,
            args.kv_cache_dtype,
        )
        gc.collect()  # free this precision's engine, graphs and KV before the next one loads
        torch.cuda.empty_cache()
        if m == "bf16":
            ref_logits = logits
        results["methods"][m] = res
        Path(args.out, "quant_bench.json").write_text(json.dumps(results, indent=2))
    results["total_seconds"] = time.perf_counter() - t_start
    Path(args.out, "quant_bench.json").write_text(json.dumps(results, indent=2))

    print(
        f"\n=== quantization, Llama-3.1-8B shape, {results['device']}, {results['date']}, KV cache {args.kv_cache_dtype}"
    )
    print("gptq = round-to-nearest 4-bit (group 128) in the GPTQ layout, for speed; its error is RTN's")
    cols = [
        ("W3 ms/tok", lambda r: r.get("w3", {}).get("decode_ms_mean")),
        ("W3 median", lambda r: r.get("w3", {}).get("decode_ms_median")),
        ("W3 w/ call 1", lambda r: r.get("w3", {}).get("decode_ms_mean_with_call1")),
        ("W3 TTFT ms", lambda r: r.get("w3", {}).get("ttft_ms")),
        ("W3 e2e", lambda r: r.get("w3", {}).get("e2e_ms_per_token")),
        ("W1 out tok/s", lambda r: r.get("w1", {}).get("output_tok_s")),
        ("W2 1k/1k", lambda r: r.get("w2_1000_1000", {}).get("output_tok_s")),
        ("rel err", lambda r: r.get("error_vs_bf16", {}).get("rel_err")),
        ("top-1", lambda r: r.get("error_vs_bf16", {}).get("top1")),
        ("weights GB", lambda r: r["startup"]["weight_gb"]),
        ("load s", lambda r: r["startup"].get("load_weights")),
        ("KV tokens", lambda r: r["startup"]["kv_capacity_tokens"]),
    ]
    print(f"{'precision':10s}" + "".join(f"{c:>14s}" for c, _ in cols))
    for m, r in results["methods"].items():
        cells = "".join(f"{v:14.3f}" if v is not None else f"{'-':>14s}" for v in (f(r) for _, f in cols))
        print(f"{m:10s}{cells}")
    fp8 = results["methods"].get("fp8", {})
    if "w3_w8a8_decode" in fp8:
        print(
            f"fp8 W3 with W8A8 decode (_scaled_mm at M=1): {fp8['w3_w8a8_decode']['decode_ms_mean']:.3f} ms/token"
        )
    measured = {
        "fp8 W3 ms/token": fp8.get("w3", {}).get("decode_ms_mean"),
        "gptq W3 ms/token": results["methods"].get("gptq", {}).get("w3", {}).get("decode_ms_mean"),
        "fp8 W2 1000/1000 out tok/s": fp8.get("w2_1000_1000", {}).get("output_tok_s"),
    }
    for lm in ("gptq-lm-head", "fp8-lm-head"):
        measured[f"{lm} W3 ms/token"] = results["methods"].get(lm, {}).get("w3", {}).get("decode_ms_mean")
    extra = {
        "gptq-lm-head W3 ms/token": TARGETS["gptq W3 ms/token"],
        "fp8-lm-head W3 ms/token": TARGETS["fp8 W3 ms/token"],
    }
    for name, target in {**TARGETS, **extra}.items():
        v = measured[name]
        if v is not None:
            ok = v <= target if "ms" in name else v >= target
            print(f"target {name:28s} {target:10.1f}   measured {v:10.3f}   {'met' if ok else 'MISSED'}")
    print(f"total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
