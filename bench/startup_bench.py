"""Cold start on one GPU: process start -> /health/ready, and weight-loading throughput from the
page cache and from a cold disk against the disk's raw sequential read rate, measured in one run.

    python bench/startup_bench.py --out $OUT     (needs root for drop_caches on the cold-disk part)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import ensure_llama8b_checkpoint


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_read_gbs(files: list[Path]) -> float:
    """Sequential read of every shard with 16 MiB reads (what `dd bs=16M` does)."""
    total = 0
    t0 = time.perf_counter()
    buf = bytearray(16 * 2**20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / 1e9 / (time.perf_counter() - t0)


def loader_gbs(model_dir: str) -> float:
    from inferfleet.worker.loader import iter_weights

    total = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _, t in iter_weights(model_dir, torch.bfloat16, "cuda"):
        total += t.numel() * t.element_size()
    torch.cuda.synchronize()
    return total / 1e9 / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_ready(model_dir: str) -> dict:
    port = free_port()
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inferfleet.worker.cli",
            "serve",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--max-model-len",
            "4096",
            "--dtype",
            "bfloat16",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = None
    first_live = None
    while time.perf_counter() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-3000:]}")
        for path in ("/health/live", "/health/ready"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                    if r.status == 200 and path == "/health/live" and first_live is None:
                        first_live = time.perf_counter() - t0
                    if r.status == 200 and path == "/health/ready":
                        ready = time.perf_counter() - t0
            except OSError:
                pass
        if ready is not None:
            break
        time.sleep(0.05)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    phases = {
        line.split('phase="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("inferfleet_startup_seconds{")
    }
    proc.terminate()
    proc.wait(timeout=60)
    return {
        "process_start_to_live_s": first_live,
        "process_start_to_ready_s": ready,
        "phases": phases,
        "exit_code": proc.returncode,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    if (made := ensure_llama8b_checkpoint(args.model_dir)) is not None:
        res["checkpoint"] = made
    files = sorted(Path(args.model_dir).glob("*.safetensors"))
    raw_read_gbs(files)  # into the page cache
    res["page_cache"] = {"raw_read_gbs": raw_read_gbs(files), "loader_gbs": loader_gbs(args.model_dir)}
    res["ready_page_cache"] = time_to_ready(args.model_dir)
    if drop_caches():
        raw = raw_read_gbs(files)
        drop_caches()
        res["cold_disk"] = {"raw_read_gbs": raw, "loader_gbs": loader_gbs(args.model_dir)}
        res["cold_disk"]["loader_over_raw"] = res["cold_disk"]["loader_gbs"] / raw
    else:
        res["cold_disk"] = "not measured: drop_caches needs root"
    Path(args.out, "startup_results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
