"""make-tiny-model determinism and layout; loading shards, dtypes, and broken checkpoints."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inferfleet.worker import LLM, EngineConfig, LLMEngine, SamplingParams
from inferfleet.worker.errors import ModelLoadError
from inferfleet.worker.tiny import make_tiny_model


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", arch="qwen3", seed=5)
    b = make_tiny_model(tmp_path / "b", arch="qwen3", seed=5)
    c = make_tiny_model(tmp_path / "c", arch="qwen3", seed=6)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    } <= set(digest(a))
    assert json.loads((a / "tokenizer_config.json").read_text())["chat_template"]


def test_cli_makes_a_loadable_sharded_checkpoint(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "sharded"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "inferfleet.worker.cli",
            "make-tiny-model",
            str(out),
            "--arch",
            "llama",
            "--seed",
            "1234",
            "--shards",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    one = LLM(model=str(tiny_llama), device="cpu").generate(
        prompt_token_ids=[[1, 2, 3]], sampling_params=params
    )
    three = LLM(model=str(out), device="cpu").generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params)
    assert one[0].token_ids == three[0].token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_run_and_stay_close(tiny_llama: Path, dtype: str) -> None:
    ref = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    low = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", dtype=dtype))
    got: dict[str, torch.Tensor] = {}
    ref.on_logits = lambda ids, lg: got.__setitem__("ref", lg.clone())
    low.on_logits = lambda ids, lg: got.__setitem__("low", lg.clone())
    for e in (ref, low):
        e.add_request("x", params=SamplingParams(max_tokens=1), prompt_token_ids=list(range(3, 40)))
        e.generate_all(["x"])
    rel = (got["low"] - got["ref"]).norm() / got["ref"].norm()
    assert rel < 3e-2, rel
    assert low.runner.kv_caches[0][0].dtype == getattr(torch, dtype)


def test_missing_tensor_and_wrong_shape_are_clear_errors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = make_tiny_model(tmp_path / "m", arch="qwen2", seed=1)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.qkv_proj\.bias"):
        LLM(model=str(d), device="cpu")
    tensors = load_file(str(make_tiny_model(tmp_path / "n", arch="qwen2", seed=1) / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "n" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight"):
        LLM(model=str(tmp_path / "n"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        LLM(model=str(tmp_path / "does-not-exist"), device="cpu")


def test_transformers_loads_our_tiny_checkpoints(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoConfig

    for arch, d in tiny_models.items():
        cfg = AutoConfig.from_pretrained(str(d))
        assert cfg.model_type == arch


def test_malformed_safetensors_headers_are_load_errors(tmp_path: Path) -> None:
    import struct

    from inferfleet.worker.loader import SafetensorsFile

    def write(header: dict, data: bytes = b"\0" * 8) -> Path:
        raw = json.dumps(header).encode()
        p = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return p

    cases = [
        {"w": {"dtype": "F32", "shape": [2]}},  # no data_offsets
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}},  # beyond the file
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},  # size does not match shape
        {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},  # unknown dtype
        {"w": "not an object"},
    ]
    for header in cases:
        with pytest.raises(ModelLoadError):
            SafetensorsFile(write(header))
    ok = SafetensorsFile(write({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}))
    assert ok.view(ok.entries[0]).tolist() == [0.0, 0.0]
