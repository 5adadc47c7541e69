"""`make demo`: a tiny random checkpoint, generated offline and then served over the OpenAI API.

Part 1 runs LLM.generate in-process. Part 2 starts `inferfleet-worker serve` on a free port, waits
for /health/ready, streams a chat completion through the official `openai` client (printing
tokens as they arrive), prints a few lines of /metrics and stops the server with SIGTERM.
Part 3 renders what the operator would create for manifests/examples/tiny-cpu.yaml.

The weights are random, so the text is gibberish; what the demo shows is the whole path working:
checkpoint layout, tokenizer, chat template, paged KV cache, continuous batching, detokenization,
token streaming, readiness, metrics and a graceful drain.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def printable(text: str) -> str:
    """Random weights emit control characters too; keep them off the terminal."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "·" for ch in text)


def offline(model_dir: Path) -> None:
    from inferfleet.worker import LLM, SamplingParams

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


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def served(model_dir: Path, log_path: Path) -> None:
    import openai

    cmd = [sys.executable, "-m", "inferfleet.worker.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--served-model-name", "tiny"]
    print(f"\n== starting the server: {' '.join(cmd[1:])}  (log: {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:

        def listening() -> re.Match[str] | None:
            if proc.poll() is not None:
                raise SystemExit(f"demo: the server exited with {proc.returncode}:\n{log_path.read_text()}")
            return re.search(r"listening on (http://[\d.]+:\d+)", log_path.read_text())

        url = wait_for(listening, 60, "the server to listen").group(1)
        phases = []

        def ready() -> bool:
            status, body = http_get(url + "/health/ready")
            phase = json.loads(body).get("phase")
            if not phases or phases[-1] != phase:
                phases.append(phase)
            return status == 200

        wait_for(ready, 120, "/health/ready")
        print(f"== {url}: readiness went {' -> '.join(phases)}")

        client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0)
        messages = [{"role": "user", "content": "Write a haiku about GPUs."}]
        print(f"\n>>> (streamed chat) {messages[0]['content']}")
        t0 = time.perf_counter()
        first = None
        stream = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=32,
            temperature=0.8,
            seed=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - t0
                print(printable(chunk.choices[0].delta.content), end="", flush=True)
            usage = chunk.usage or usage
        dt = time.perf_counter() - t0
        ttft = f"{first * 1000:.0f} ms" if first is not None else "n/a"
        print(f"\n    [{usage.completion_tokens} tokens in {dt:.2f}s, first token after {ttft}]")

        _, metrics = http_get(url + "/metrics")
        wanted = (
            "inferfleet_ready ",
            "inferfleet_prompt_tokens_total ",
            "inferfleet_generation_tokens_total ",
            'inferfleet_requests_total{finish_reason="length"}',
            "inferfleet_time_to_first_token_seconds_count",
            "inferfleet_kv_cache_usage_ratio ",
            "inferfleet_startup_seconds{",
        )
        print("\n== a few lines of /metrics")
        for line in metrics.splitlines():
            if line.startswith(wanted):
                print("   ", line)

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        print(f"\n== SIGTERM: the server drained and exited with code {rc}")
        if rc != 0:
            raise SystemExit(f"demo: the server exited with {rc}:\n{log_path.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".demo", help="where the tiny checkpoint goes")
    ap.add_argument("--arch", default="llama")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from inferfleet.worker.tiny import make_tiny_model

    model_dir = make_tiny_model(Path(args.dir) / f"tiny-{args.arch}", arch=args.arch, seed=0)
    print(f"== tiny {args.arch} checkpoint in {model_dir}")
    offline(model_dir)
    served(model_dir, Path(args.dir) / "server.log")
    render_fleet()


def render_fleet() -> None:
    """Part 3: what the operator would create for the examples, without a cluster."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    for name in ("tiny-cpu.yaml", "llama-3.1-8b.yaml"):
        example = root / "manifests" / "examples" / name
        out = subprocess.run(
            [sys.executable, "-m", "inferfleet.operator.cli", "render", "-f", str(example)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        print(f"\n== inferfleet-operator render -f manifests/examples/{name}")
        for obj in yaml.safe_load_all(out):
            if obj:
                print(f"   {obj['kind']:22s} {obj['metadata']['name']}")


if __name__ == "__main__":
    main()
