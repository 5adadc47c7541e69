"""`inferfleet-worker serve` as a process: readiness during a slow load (--debug-load-delay), SIGTERM
during active streams (they complete, exit 0), clean startup errors, the operator's flags."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from inferfleet.worker import cli
from server_helpers import MODEL, ServerProcess, wait_until


def test_slow_load_then_sigterm_during_streams(tiny_llama: Path, tmp_path: Path) -> None:
    srv = ServerProcess(
        tiny_llama,
        tmp_path / "server.log",
        "--debug-load-delay",
        "2",
        "--drain-timeout",
        "30",
        env={"INFERFLEET_API_KEY": "k3y"},
    )
    try:
        # listening but loading: live 200, ready 503 {"phase": "loading"}, /v1 503 + Retry-After
        live = srv.get("/health/live")
        assert live.status_code == 200 and live.json() == {"phase": "loading"}
        ready = srv.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"phase": "loading"}
        v1 = srv.get("/v1/models", headers={"Authorization": "Bearer k3y"})
        assert v1.status_code == 503 and v1.headers["Retry-After"] and v1.json()["error"]["code"] == "loading"
        assert srv.get("/v1/models").status_code == 401  # the key from the environment is enforced
        srv.wait_ready(60)
        assert srv.metrics()["inferfleet_ready"] == 1
        assert srv.metrics()['inferfleet_startup_seconds{phase="total"}'] >= 2

        client = srv.openai(api_key="k3y")
        results: list[Any] = [None] * 4
        first_chunk = [threading.Event() for _ in range(4)]

        def stream(i: int) -> None:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"stream {i}"}],
                max_tokens=800,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, reason, usage = "", None, None
            for c in chunks:
                first_chunk[i].set()
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    reason = c.choices[0].finish_reason or reason
                usage = c.usage or usage
            results[i] = (text, reason, usage.completion_tokens if usage else None, time.monotonic())

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for e in first_chunk:
            assert e.wait(30)
        signalled = time.monotonic()
        srv.terminate()
        # draining: ready 503 at once, new requests 503 + Retry-After, live still 200
        wait_until(lambda: srv.get("/health/ready").status_code == 503, 5, what="ready 503")
        assert srv.get("/health/ready").json() == {"phase": "draining"}
        assert any(t.is_alive() for t in threads), "streams must still be running during the drain"
        r = srv.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "draining"
        assert srv.get("/health/live").status_code == 200
        assert srv.wait(60) == 0
        for t in threads:
            t.join(10)
        for text, reason, completion_tokens, ended in results:
            assert (reason, completion_tokens) == ("length", 800) and text
            assert ended > signalled
        assert "SIGTERM: draining" in srv.log()
    finally:
        srv.stop()


def test_sigterm_while_idle_exits_0(tiny_llama: Path, tmp_path: Path) -> None:
    srv = ServerProcess(tiny_llama, tmp_path / "server.log")
    try:
        srv.wait_ready(60)
        srv.terminate()
        assert srv.wait(30) == 0
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantization", "fp8"], "quantization must be one of"),
        (["--max-model-len", "999999"], "max_model_len must be in"),
    ],
)
def test_bad_engine_flags_are_a_clean_startup_error(
    tiny_llama: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["serve", "--model", str(tiny_llama), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_missing_model_dir_is_a_clean_startup_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_operator_flags_parse(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly what the operator passes (and its environment) reaches the engine and server configs."""
    seen: dict[str, Any] = {}

    def fake_run(engine_config: Any, config: Any, started_at: float | None = None) -> int:
        seen["engine"], seen["server"] = engine_config, config
        return 0

    monkeypatch.setattr("inferfleet.worker.server.run", fake_run)
    monkeypatch.setenv("INFERFLEET_API_KEY", "from-env")
    argv = ["serve", "--model", str(tiny_llama), "--host", "0.0.0.0", "--port", "8000"]
    argv += [
        "--served-model-name",
        "m",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
    ]
    argv += ["--block-size", "16", "--gpu-memory-utilization", "0.85", "--quantization", "none"]
    argv += ["--no-enable-prefix-caching", "--drain-timeout", "45", "--device", "cpu"]
    assert cli.main(argv) == 0
    e, s = seen["engine"], seen["server"]
    assert (e.name, e.dtype, e.max_model_len, e.max_num_seqs, e.block_size) == ("m", "float32", 512, 8, 16)
    assert (e.gpu_memory_utilization, e.quantization, e.enable_prefix_caching) == (0.85, "none", False)
    assert (s.host, s.port, s.drain_timeout, s.api_key) == ("0.0.0.0", 8000, 45.0, "from-env")
    # --api-key wins over the environment
    assert cli.main([*argv, "--api-key", "flag"]) == 0 and seen["server"].api_key == "flag"
