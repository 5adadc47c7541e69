"""`inferfleet-worker serve --quantization int8|gptq` on a CPU worker, as the operator starts it."""

from __future__ import annotations

from pathlib import Path

import pytest
from inferfleet.worker.quant.calibrate import QuantizeSpec, quantize_checkpoint
from server_helpers import MODEL, ServerProcess


@pytest.fixture(scope="module")
def gptq_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served") / "tiny-llama-gptq"
    quantize_checkpoint(tiny_llama, out, QuantizeSpec(method="rtn", group_size=32), device="cpu")
    return out


@pytest.mark.parametrize("case", ["int8", "gptq-detected", "gptq-explicit"])
def test_quantized_server_streams_a_completion(
    case: str, tiny_llama: Path, gptq_model: Path, tmp_path: Path
) -> None:
    model, args = {
        "int8": (tiny_llama, ["--quantization", "int8"]),
        "gptq-detected": (gptq_model, []),
        "gptq-explicit": (gptq_model, ["--quantization", "gptq"]),
    }[case]
    srv = ServerProcess(model, tmp_path / "server.log", *args)
    try:
        srv.wait_ready(60)
        client = srv.openai()
        chunks = list(
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, stream=True, temperature=0)
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop") and isinstance(text, str)
        expected = "int8 (quantized at load)" if case == "int8" else "gptq 4-bit, group 32"
        assert f"quantized projections: {expected}" in srv.log()
    finally:
        srv.stop()
