"""Temperature sampling of a decode step's rows on CUDA: torch's path (gather, scale, softmax, an
exponential draw, divide, argmax) against the one-pass kernel (kernels/elementwise.sample_rows),
over a Llama-3 vocabulary in float32, as sample_device calls them. Then, timed as replays of CUDA
graphs (the GPU alone): the kernel's launches by rows, logits dtype, programs per row (`splits`),
block and warps; and a step's logits-to-token tail the way the engine ran it before the nineteenth
session (lm_head in bf16, widened to float32, an argmax, one program per row) against now (bf16
logits read as they are, no argmax when every row is drawn, the default split); and the default
launch with the noise's logarithms through logf against lg2.approx.

    python bench/sampling_bench.py [--out DIR] [--only paths,kernel,sweep,tail,log]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from inferfleet.worker.kernels.elementwise import sample_rows
from inferfleet.worker.sampling import SampleRequest, race_one_pass, race_torch
from inferfleet.worker.sampling_params import SamplingParams
from microbench import graph_us, time_ms
from torch.nn import functional as F

VOCAB = 128256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="paths,kernel,sweep,tail,log", help="comma-separated sections")
    args = ap.parse_args()
    only = set(args.only.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    if "paths" in only or "kernel" in only:
        paths_and_kernel(result, g)
    if "sweep" in only:
        result["sweep"] = split_sweep(g)
    if "tail" in only:
        result["tail"] = step_tail(g)
    if "log" in only:
        result["log"] = fast_log(g)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sampling_bench.json").write_text(json.dumps(result, indent=1))


def split_sweep(g: torch.Generator) -> dict:
    """sample_rows alone by (rows, dtype, splits, block, warps); each launch's tokens checked
    against one program per row's with the same block before it is timed."""
    res: dict = {}
    print(
        f"\nsample_rows, us per launch (GPU): {'rows':>5} {'dtype':>8} {'splits':>6} {'block':>6} {'warps':>5} {'us':>8} {'GB/s':>6}"
    )
    for n in (32, 137, 256):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(n, VOCAB, device="cuda", generator=g).to(dtype)
            rows = torch.arange(n, device="cuda")
            temps = torch.full((n,), 0.6, device="cuda")
            seeds = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
            refs = {}  # by block: the chunk size sets which Philox draw each column takes
            for block in (8192, 4096, 2048):
                refs[block] = torch.empty(n, dtype=torch.int64, device="cuda")
                sample_rows(logits, rows, temps, seeds, refs[block], block, 16, 1)
            for splits in (1, 2, 4, 8, 16):
                for block, warps in ((8192, 16), (8192, 8), (4096, 8), (4096, 4), (2048, 4)):
                    ref = refs[block]
                    out = torch.empty(n, dtype=torch.int64, device="cuda")
                    fn = lambda o=out, s=splits, b=block, w=warps: sample_rows(  # noqa: E731
                        logits, rows, temps, seeds, o, b, w, s
                    )
                    fn()
                    assert torch.equal(out, ref), (n, dtype, splits, block, warps)
                    us = graph_us(fn)
                    gbs = logits.numel() * logits.element_size() / us / 1e3
                    key = f"{n},{str(dtype)[6:]},{splits},{block},{warps}"
                    res[key] = us
                    print(
                        f"{'':34} {n:5d} {str(dtype)[6:]:>8} {splits:6d} {block:6d} {warps:5d} {us:8.1f} {gbs:6.0f}",
                        flush=True,
                    )
    return res


def fast_log(g: torch.Generator) -> dict:
    """The default launch with the noise's logarithms through logf (tl.log) against lg2.approx
    (elementwise.FAST_LOG), bf16 logits, and how many rows draw the same token from the same seeds."""
    res: dict = {}
    print(
        f"\nsample_rows, us per launch (GPU): {'rows':>5} {'logf':>8} {'lg2.approx':>11} {'same token':>11}"
    )
    for n in (32, 137, 256):
        logits = torch.randn(n, VOCAB, device="cuda", generator=g).to(torch.bfloat16)
        rows = torch.arange(n, device="cuda")
        temps = torch.full((n,), 0.6, device="cuda")
        seeds = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
        outs = {f: torch.empty(n, dtype=torch.int64, device="cuda") for f in (False, True)}
        us = {}
        for f, out in outs.items():
            fn = lambda o=out, f=f: sample_rows(logits, rows, temps, seeds, o, fast_log=f)  # noqa: E731
            fn()
            us[f] = graph_us(fn)
        same = float((outs[False] == outs[True]).float().mean())
        res[n] = {"logf_us": us[False], "lg2_approx_us": us[True], "same_token": same}
        print(f"{'':34} {n:5d} {us[False]:8.1f} {us[True]:11.1f} {same:11.3f}", flush=True)
    return res


def step_tail(g: torch.Generator) -> dict:
    """A step's tail from the final hidden rows to the drawn tokens, at sample rows W1's mixed steps
    hold (~137 on average) and a full decode step's 256: before (bf16 lm_head, widened, torch
    argmax, one program per row) and now (bf16 logits, no argmax, the default split)."""
    res: dict = {}
    w = torch.randn(VOCAB, 4096, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    print(f"\nlogits -> tokens, us per step (GPU): {'rows':>5} {'before':>8} {'now':>8}")
    for n in (64, 137, 256):
        h = torch.randn(n, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
        rows = torch.arange(n, device="cuda")
        temps = torch.full((n,), 0.6, device="cuda")
        seeds = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
        a = torch.empty(n, dtype=torch.int64, device="cuda")
        b = torch.empty(n, dtype=torch.int64, device="cuda")

        def before(out: torch.Tensor = a) -> None:
            logits = F.linear(h, w).float()
            out.copy_(logits.argmax(dim=-1))
            sample_rows(logits, rows, temps, seeds, out, splits=1)

        def now(out: torch.Tensor = b) -> None:
            sample_rows(F.linear(h, w), rows, temps, seeds, out)

        before()
        now()
        assert torch.equal(a, b), n
        res[n] = {"before_us": graph_us(before), "now_us": graph_us(now)}
        print(f"{'':36} {n:5d} {res[n]['before_us']:8.1f} {res[n]['now_us']:8.1f}", flush=True)
    return res


def paths_and_kernel(result: dict, g: torch.Generator) -> None:
    req = SampleRequest(SamplingParams(temperature=0.6), None, [])
    print(f"{'rows':>5} {'torch ms':>9} {'one pass ms':>12} {'one pass GB/s':>14}")
    for n in (1, 8, 64, 256):
        logits = torch.randn(n, VOCAB, device="cuda", generator=g)
        tokens = torch.zeros(n, dtype=torch.int64, device="cuda")
        rows = list(range(n))
        reqs = [req] * n
        t_torch = time_ms(lambda: race_torch(logits, reqs, rows, g, tokens))
        t_one = time_ms(lambda: race_one_pass(logits, reqs, rows, g, tokens))
        gbs = logits.numel() * 4 / t_one / 1e6
        result["rows"][n] = {"torch_ms": t_torch, "one_pass_ms": t_one, "one_pass_gb_s": gbs}
        print(f"{n:5d} {t_torch:9.3f} {t_one:12.3f} {gbs:14.0f}", flush=True)
    # the kernel alone (inputs already on the device) at 256 rows, by launch
    n = 256
    logits = torch.randn(n, VOCAB, device="cuda", generator=g)
    out = torch.zeros(n, dtype=torch.int64, device="cuda")
    rows = torch.arange(n, device="cuda")
    temps = torch.full((n,), 0.6, device="cuda")
    seeds = torch.randint(0, 2**62, (n,), device="cuda", generator=g)
    print(f"\nkernel only, {n} rows: {'block':>6} {'warps':>6} {'ms':>7} {'GB/s':>6}")
    result["kernel_256"] = {}
    for block in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            ms = time_ms(lambda: sample_rows(logits, rows, temps, seeds, out, block, warps, 1))
            result["kernel_256"][f"{block},{warps}"] = ms
            print(f"{'':22} {block:6d} {warps:6d} {ms:7.3f} {logits.numel() * 4 / ms / 1e6:6.0f}", flush=True)


if __name__ == "__main__":
    main()
