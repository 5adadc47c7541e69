"""Temperature sampling of a decode step's rows on CUDA: torch's path (gather, scale, softmax, an
exponential draw, divide, argmax) against the one-pass kernel (kernels/elementwise.sample_rows),
over a Llama-3 vocabulary in float32, as sample_device calls them.

    python bench/sampling_bench.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from inferfleet.worker.kernels.elementwise import sample_rows
from inferfleet.worker.sampling import SampleRequest, race_one_pass, race_torch
from inferfleet.worker.sampling_params import SamplingParams
from microbench import time_ms

VOCAB = 128256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    req = SampleRequest(SamplingParams(temperature=0.6), None, [])
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
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
            ms = time_ms(lambda: sample_rows(logits, rows, temps, seeds, out, block, warps))
            result["kernel_256"][f"{block},{warps}"] = ms
            print(f"{'':22} {block:6d} {warps:6d} {ms:7.3f} {logits.numel() * 4 / ms / 1e6:6.0f}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sampling_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
