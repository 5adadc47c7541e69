"""GPTQ itself (quant/gptq_quantizer.py) and `inferfleet-worker quantize` (quant/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inferfleet.worker import LLM, SamplingParams, cli
from inferfleet.worker.quant.calibrate import (
    QuantizeSpec,
    _load_dense_model,
    calibration_samples,
    dense_logits,
    gptq_model,
)
from inferfleet.worker.quant.evaluate import build_model, prompt_logits
from inferfleet.worker.quant.gptq import gptq_dequantize
from inferfleet.worker.quant.gptq_quantizer import gptq_quantize, reconstruction_error, rtn_quantize
from inferfleet.worker.tiny import _CORPUS

CALIBRATION = "\n".join(_CORPUS.splitlines()[:8])  # the last lines stay held out for error tests


def correlated_inputs(k: int, n: int, seed: int) -> torch.Tensor:
    """Activations with a few strong, correlated directions (as LLM hidden states have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[None, :]
    return torch.randn(n, k, generator=g) @ mix.t() + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize(("group", "act_order", "sym"), [(32, False, True), (32, True, True), (-1, True, False), (128, False, False)])  # fmt: skip
def test_gptq_beats_round_to_nearest_on_its_objective(group: int, act_order: bool, sym: bool) -> None:
    k = 256
    x = correlated_inputs(k, 2048, seed=1)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(2))
    res = gptq_quantize(w, h, bits=4, group_size=group, sym=sym, act_order=act_order)
    rtn = rtn_quantize(w, 4, group, sym)
    e_gptq, e_rtn = reconstruction_error(w, res.dequant, h), reconstruction_error(w, rtn.dequant, h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the result is exactly representable in the layout: codes, per-group scales/zeros, g_idx
    g = res.g_idx.long()
    assert torch.allclose(res.scales[g].t() * (res.codes - res.zeros[g].t()), res.dequant, atol=1e-6)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 15
    groups = 1 if group == -1 else k // group
    assert torch.equal(torch.bincount(g, minlength=groups), torch.full((groups,), k // groups))
    if not act_order:
        assert torch.equal(g, torch.arange(k) // (k if group == -1 else group))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    """H = I: no error is worth moving to other columns, so GPTQ reduces to RTN exactly."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    res = gptq_quantize(w, torch.eye(64), bits=4, group_size=32, damp=1e-6)
    assert torch.equal(res.codes, rtn_quantize(w, 4, 32, True).codes)


def test_calibration_forward_is_the_engine_forward(tiny_models: dict[str, Path]) -> None:
    """The dense layer-by-layer path GPTQ calibrates with computes what the engine computes."""
    for arch, path in tiny_models.items():
        samples = calibration_samples(CALIBRATION, path, nsamples=2, seqlen=40, seed=0)
        model = _load_dense_model(path, torch.device("cpu"), 64)
        with torch.inference_mode():
            dense = dense_logits(model, samples)
        engine = prompt_logits(build_model(str(path)), samples.tolist())
        for a, b in zip(dense, engine):
            assert float((a - b).norm() / b.norm()) < 1e-5, arch


@pytest.mark.parametrize(("arch", "group", "act_order"), [("llama", 32, False), ("qwen3", 32, True), ("qwen2", -1, True), ("mistral", 32, True)])  # fmt: skip
def test_gptq_error_below_round_to_nearest_on_every_layer(
    tiny_models: dict[str, Path], arch: str, group: int, act_order: bool
) -> None:
    spec = QuantizeSpec(group_size=group, act_order=act_order, nsamples=32, seqlen=64)
    samples = calibration_samples(CALIBRATION, tiny_models[arch], spec.nsamples, spec.seqlen, spec.seed)
    _, reports = gptq_model(tiny_models[arch], samples, spec, torch.device("cpu"))
    assert len(reports) == 4 * 2  # qkv, o, gate_up, down in both layers
    print(f"\n{arch} group {group} act-order {act_order}: ||WX - Q(W)X||^2, GPTQ vs round-to-nearest")
    for r in reports:
        print(
            f"  {r.name:36s} gptq {r.gptq_error:.4e}  rtn {r.rtn_error:.4e}  ratio {r.gptq_error / r.rtn_error:.3f}"
        )
        assert r.gptq_error < r.rtn_error, r


def test_quantize_cli_writes_a_checkpoint_that_loads_and_generates(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    out = tmp_path / "gptq"
    argv = ["quantize", "--method", "gptq", "--calibration", str(calib), "--model", str(tiny_llama)]
    argv += ["--out", str(out), "--bits", "4", "--group-size", "32", "--act-order", "--damp", "0.01"]
    argv += ["--nsamples", "16", "--seqlen", "64", "--device", "cpu"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "less error" in printed
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (
        "gptq",
        4,
        32,
        True,
        True,
    )
    assert qc["checkpoint_format"] == "gptq"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "quantize_report.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "quantize_report.json").read_text())
    assert all(r["gptq_error"] < r["rtn_error"] for r in report["layers"])
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj."
    assert t[q + "qweight"].dtype == torch.int32 and t[q + "qweight"].shape == (64 // 8, 64)
    assert t[q + "qzeros"].shape == (2, 64 // 8) and t[q + "scales"].dtype == torch.float16
    assert int(t[q + "qzeros"].view(-1)[0]) == 0x77777777  # symmetric: zero 8, stored minus one
    assert "model.layers.0.self_attn.q_proj.weight" not in t and "lm_head.weight" in t

    llm = LLM(str(out), device="cpu")
    assert llm.engine.config.quantization == "gptq"
    res = llm.generate(["The scheduler admits"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(res.token_ids) == 12 and res.finish_reason == "length"
    # the written tensors hold exactly the matrices GPTQ computed (same seed, same samples)
    spec = QuantizeSpec(group_size=32, act_order=True, nsamples=16, seqlen=64)
    samples = calibration_samples(CALIBRATION, tiny_llama, spec.nsamples, spec.seqlen, spec.seed)
    results, _ = gptq_model(tiny_llama, samples, spec, torch.device("cpu"))
    for i, module in enumerate(("q_proj", "k_proj", "v_proj")):
        p = f"model.layers.1.self_attn.{module}."
        got = gptq_dequantize(t[p + "qweight"], t[p + "qzeros"], t[p + "scales"], t[p + "g_idx"], 4)
        want = results["model.layers.1.self_attn.qkv_proj"].dequant[[0, 64, 96][i] :][: got.shape[0]]
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)  # scales stored as fp16


def test_quantize_cli_refuses_bad_input(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli.main(base) == 2  # gptq without calibration text
    assert "needs --calibration" in capsys.readouterr().err
    assert cli.main([*base, "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --calibration" in capsys.readouterr().err
    assert cli.main([*base, "--method", "rtn", "--act-order"]) == 2
    assert "act-order needs calibration" in capsys.readouterr().err


def test_quantized_lm_head_writes_loads_and_generates(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """`quantize --lm-head` (GPTQModel's lm_head=True): lm_head is GPTQ'd from the final norm's outputs
    of the quantized decoder, beats round-to-nearest on its objective, is stored in the GPTQ layout
    with `lm_head: true`, and the worker loads it quantized (never tied) and generates with it."""
    from inferfleet.worker.quant.calibrate import quantize_checkpoint
    from inferfleet.worker.quant.spec import checkpoint_quantization

    llama = tiny_models["llama"]
    spec = QuantizeSpec(group_size=32, nsamples=16, seqlen=64, lm_head=True)
    out = tmp_path / "gptq-lm-head"
    reports = quantize_checkpoint(llama, out, spec, calibration_text=CALIBRATION, device="cpu")
    assert [r.name for r in reports][-1] == "lm_head" and len(reports) == 4 * 2 + 1
    assert all(r.gptq_error < r.rtn_error for r in reports), reports[-1]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] is True
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in t and t["lm_head.qweight"].dtype == torch.int32
    assert "model.embed_tokens.weight" in t  # the embedding stays as it was

    model = build_model(str(out), checkpoint_quantization(qc))
    assert model.lm_head.method is not None
    results, _ = gptq_model(
        llama, calibration_samples(CALIBRATION, llama, 16, 64, 0), spec, torch.device("cpu")
    )
    got = model.lm_head.method.dequantize(model.lm_head)  # the loaded layer holds what GPTQ computed
    assert torch.allclose(got, results["lm_head"].dequant, rtol=1e-3, atol=1e-6)
    # logits error against the unquantized model, next to the same checkpoint with a plain lm_head
    plain = tmp_path / "gptq"
    quantize_checkpoint(llama, plain, QuantizeSpec(group_size=32, nsamples=16, seqlen=64), CALIBRATION, "cpu")
    prompts = calibration_samples("\n".join(_CORPUS.splitlines()[8:]), llama, 2, 32, 1).tolist()
    ref = prompt_logits(build_model(str(llama)), prompts)
    plain_model = build_model(
        str(plain),
        checkpoint_quantization(json.loads((plain / "config.json").read_text())["quantization_config"]),
    )
    err = [float((a - r).norm() / r.norm()) for a, r in zip(prompt_logits(model, prompts), ref)]
    err_plain = [float((a - r).norm() / r.norm()) for a, r in zip(prompt_logits(plain_model, prompts), ref)]
    print(f"\nrelative logits error vs unquantized: lm_head quantized {err}, lm_head plain {err_plain}")
    # the 4-bit lm_head adds an error of its own, small next to the decoder's (0.15 -> 0.17 here)
    assert all(p < e < p + 0.1 for e, p in zip(err, err_plain))

    llm = LLM(str(out), device="cpu")
    res = llm.generate(["The scheduler admits"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(res.token_ids) == 12 and res.finish_reason == "length"


def test_quantize_lm_head_refuses_tied_embeddings(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from inferfleet.worker.errors import InvalidRequestError
    from inferfleet.worker.quant.calibrate import quantize_checkpoint

    tied = next(
        p for p in tiny_models.values() if json.loads((p / "config.json").read_text())["tie_word_embeddings"]
    )
    with pytest.raises(InvalidRequestError, match="ties lm_head"):
        quantize_checkpoint(tied, tmp_path / "x", QuantizeSpec(method="rtn", lm_head=True), device="cpu")
    assert not (tmp_path / "x").exists()
    # a vocabulary that does not pack into whole int32 words of zeros is refused before any work
    from dataclasses import replace

    from inferfleet.worker.config import ModelConfig
    from inferfleet.worker.quant.calibrate import check_lm_head

    mc = ModelConfig.from_pretrained(tiny_models["llama"])
    check_lm_head(QuantizeSpec(lm_head=True), mc)
    with pytest.raises(InvalidRequestError, match="not a multiple of 8"):
        check_lm_head(QuantizeSpec(lm_head=True), replace(mc, vocab_size=mc.vocab_size + 1))
    check_lm_head(QuantizeSpec(lm_head=False), replace(mc, vocab_size=mc.vocab_size + 1))
