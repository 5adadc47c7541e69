"""kv_cache_dtype fp8: float8_e4m3fn KV cache, per-layer scales (1.0 unless a checkpoint has them;
docs/quantization.md, "FP8 KV cache").

The engine runs the tiny Llama in float32 on the CPU with kv_cache_dtype "fp8" and "auto" and
compares them step by step: the prefill step and every decode step whose context is still the
same in both runs (up to and including the first step where their greedy tokens part) give a
logits row to compare. The bounds are ~1.7x the errors measured on this machine; run with -s to
print the measurements.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    common_prefix,
    greedy_run,
    kv_rescaled,
    kv_rescaled_tensors,
    kv_scale_tensors,
    set_kv_scales,
)
from inferfleet.worker import EngineConfig, LLMEngine, cli
from inferfleet.worker.config import KV_CACHE_DTYPES
from inferfleet.worker.errors import InvalidRequestError
from inferfleet.worker.layers.attention import KV_FP8_MAX, write_kv
from inferfleet.worker.quant.evaluate import logits_error, prompt_logits
from server_helpers import MODEL, ServerProcess

MAX_TOKENS = 24
# measured (torch 2.13 CPU, tiny llama seed 1234, the 12 prompts below, 180 compared logits rows):
# relative logits error max 0.0589, mean 0.0224
MAX_REL_ERROR = 0.10
MEAN_REL_ERROR = 0.04
# measured: 173 of 288 greedy tokens (0.601) lie in the common prefix of both runs' outputs, 5 of 12
# outputs identical. The tiny random model's logits are flat (std ~0.4, top-2 gaps of ~0.01), so a
# 2-6 % logits error flips near ties: the divergence margin below is the honest check
MIN_AGREEMENT = 0.4
# measured: at every first divergence the float32 run's margin between the two tokens was at most
# 0.060 x the spread (std) of that logits row: tokens part only at near ties
MAX_DIVERGENCE_MARGIN = 0.12
# teacher-forced (one prefill per prompt, all 584 positions): measured rel error 0.0277, top-1 0.962
TF_REL_ERROR = 0.05
TF_MIN_TOP1 = 0.92


def prompts(seed: int = 0, n: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 90))] for _ in range(n)]


def run(model: Path, kv_cache_dtype: str, ps: list[list[int]], **kw: object) -> tuple[list[list[int]], list[list[torch.Tensor]], LLMEngine]:  # fmt: skip
    return greedy_run(
        model, ps, MAX_TOKENS, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, **kw
    )


@pytest.fixture(scope="module")
def runs(tiny_llama: Path) -> dict[str, tuple[list[list[int]], list[list[torch.Tensor]], LLMEngine]]:
    ps = prompts()
    # fp8 prefills in chunks of 32 tokens: later chunks read the earlier ones back from the fp8 cache
    return {
        "auto": run(tiny_llama, "auto", ps),
        "fp8": run(tiny_llama, "fp8", ps, max_num_batched_tokens=32),
    }


def test_fp8_cache_tensors(runs: dict) -> None:
    auto, fp8 = runs["auto"][2].runner, runs["fp8"][2].runner
    assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in fp8.kv_caches)
    assert all(k.dtype == v.dtype == torch.float32 for k, v in auto.kv_caches)  # auto: the model dtype
    assert fp8.config.kv_cache_dtype == "fp8" and auto.config.kv_cache_dtype == "auto"


def test_fixed_budget_holds_twice_the_blocks_of_bf16(tiny_llama: Path) -> None:
    def runner(dtype: str, kv: str):  # type: ignore[no-untyped-def]
        cfg = EngineConfig(
            model=str(tiny_llama),
            device="cpu",
            dtype=dtype,
            kv_cache_dtype=kv,
            max_model_len=256,
            kv_cache_memory_bytes=2 * 2**20,
        )
        return LLMEngine(cfg).runner

    bf16, fp8_bf16, f32, fp8_f32 = (
        runner("bfloat16", "auto"),
        runner("bfloat16", "fp8"),
        runner("float32", "auto"),
        runner("float32", "fp8"),
    )
    assert fp8_bf16.bytes_per_block() * 2 == bf16.bytes_per_block()
    assert fp8_bf16.num_blocks == 2 * bf16.num_blocks == 1024  # 2 MiB / 2 KiB, 2 MiB / 4 KiB
    assert fp8_f32.bytes_per_block() * 4 == f32.bytes_per_block()
    assert fp8_f32.num_blocks == fp8_bf16.num_blocks == 4 * f32.num_blocks
    assert fp8_bf16.capacity_tokens == 2 * bf16.capacity_tokens


def _compared_rows(runs: dict):  # type: ignore[no-untyped-def]
    """(auto row, fp8 row, auto token, fp8 token) for every step both runs took from the same context."""
    (ta, la, _), (tf, lf, _) = runs["auto"], runs["fp8"]
    for a, b, xa, xb in zip(ta, tf, la, lf):
        assert len(xa) == len(xb) == MAX_TOKENS  # one sampled row per generated token
        k = common_prefix(a, b)
        for i in range(min(k + 1, len(a))):  # the contexts agree up to and including step k
            yield xa[i], xb[i], a[i], b[i]


def test_logits_error_is_bounded(runs: dict) -> None:
    errs = [float((xb - xa).norm() / xa.norm()) for xa, xb, _, _ in _compared_rows(runs)]
    worst, mean = max(errs), sum(errs) / len(errs)
    print(
        f"\nfp8 KV vs auto, float32 CPU: {len(errs)} logits rows, rel error max {worst:.4f} mean {mean:.4f}"
    )
    assert worst < MAX_REL_ERROR and mean < MEAN_REL_ERROR
    assert worst > 1e-4  # the cache really is fp8: the error is not zero


def test_greedy_tokens_mostly_agree(runs: dict) -> None:
    (ta, la, _), (tf, _, _) = runs["auto"], runs["fp8"]
    common, whole, margins = 0, 0, []
    for a, b, xa in zip(ta, tf, la):
        k = common_prefix(a, b)
        common += k
        whole += k == len(a)
        if k < len(a):
            row = xa[k]
            margins.append(float(row[a[k]] - row[b[k]]) / float(row.std()))
    agreement = common / sum(len(a) for a in ta)
    print(
        f"\ngreedy: {agreement:.3f} of tokens in the common prefix, {whole}/{len(ta)} outputs identical; "
        f"max margin at a divergence {max(margins, default=0.0):.3f} std"
    )
    assert agreement >= MIN_AGREEMENT
    # a random tiny model has flat logits (std ~0.4): greedy tokens part only where two were near-tied
    assert all(0.0 <= m < MAX_DIVERGENCE_MARGIN for m in margins), margins


def test_torch_write_path_clamps_outliers() -> None:
    """1000.0 is stored as 448 (the largest finite e4m3 value), not NaN. (torch 2.13's CPU cast
    saturates on its own too; Triton's conversion does not: tests/gpu/kernel_cases.py checks the
    kernel's clamp.)"""
    kc = torch.zeros(2, 4, 1, 3, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    k = torch.tensor([[[1000.0, -1000.0, 0.3]]])
    v = torch.tensor([[[float("inf"), 449.0, -2.0]]])
    write_kv(k, v, kc, vc, torch.tensor([5]))
    got_k, got_v = kc.view(-1, 1, 3)[5].float(), vc.view(-1, 1, 3)[5].float()
    assert got_k.tolist() == [[KV_FP8_MAX, -KV_FP8_MAX, 0.3125]]  # 0.3 rounds to the nearest e4m3
    assert got_v.tolist() == [[KV_FP8_MAX, KV_FP8_MAX, -2.0]]
    assert not kc.float().isnan().any() and kc.float().abs().sum() == 2 * KV_FP8_MAX + 0.3125


def test_bad_kv_cache_dtype_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype") as e:
        EngineConfig(model=str(tiny_llama), device="cpu", kv_cache_dtype="int4")
    assert e.value.param == "kv_cache_dtype" and "int4" in str(e.value)
    assert KV_CACHE_DTYPES == cli.KV_CACHE_DTYPES == ("auto", "fp8")
    assert EngineConfig(model=str(tiny_llama), device="cpu").kv_cache_dtype == "auto"


def test_generate_cli_takes_the_flag(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "generate",
        "--model",
        str(tiny_llama),
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
    ]
    assert cli.main([*argv, "--kv-cache-dtype", "fp8"]) == 0
    assert "(3 tokens, length)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([*argv, "--kv-cache-dtype", "int4"])


def test_server_with_fp8_kv_cache(tiny_llama: Path, tmp_path: Path) -> None:
    """`serve --kv-cache-dtype fp8` as the operator starts it: the flag reaches the engine, the
    startup log names the KV dtype, and capacity (blocks) and /metrics are reported as usual."""
    args = ("--kv-cache-dtype", "fp8", "--num-kv-blocks", "64", "--max-model-len", "512")
    srv = ServerProcess(tiny_llama, tmp_path / "server.log", *args)
    try:
        srv.wait_ready(60)
        out = srv.openai().completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
        assert "KV cache: 64 blocks of 16 tokens = 1024 token slots" in srv.log()
        assert "float8_e4m3fn)" in srv.log()
        m = srv.metrics()
        assert (
            m["inferfleet_generation_tokens_total"] >= 1
            and 0.0 <= m["inferfleet_kv_cache_usage_ratio"] <= 1.0
        )
    finally:
        srv.stop()


def test_teacher_forced_error_over_every_prompt_position(runs: dict) -> None:
    """quant/evaluate.prompt_logits (what bench/quant_bench.py reports) with an fp8 scratch cache:
    every position of the same prompts, so no greedy divergence can hide or add error."""
    model = runs["auto"][2].runner.model
    ps = prompts()
    err = logits_error(prompt_logits(model, ps), prompt_logits(model, ps, kv_dtype=torch.float8_e4m3fn))
    print(
        f"\nteacher-forced, {int(err['positions'])} positions: rel error {err['rel_err']:.4f}, top-1 {err['top1']:.3f}"
    )
    assert err["rel_err"] < TF_REL_ERROR and err["top1"] > TF_MIN_TOP1


def test_checkpoint_kv_scales_hold_values_beyond_e4m3(runs: dict) -> None:
    """The tiny model rescaled so that its K and V reach far beyond +-448 and compute the same
    function (q and o_proj's input side divided by F, K and V multiplied by F): an fp8 cache with
    the layers' k_scale / v_scale = F (what a checkpoint's kv_cache_scheme sets) stores the same
    codes as the original model's and gives its error; with the scales left at 1.0 the values
    saturate at 448 and the logits are far off."""
    base = runs["auto"][2].runner.model
    big_k, big_v = 1024.0, 2048.0  # powers of two: the rescaled weights are exact
    model = kv_rescaled(base, big_k, big_v)
    ps = prompts()
    ref = prompt_logits(base, ps)
    assert logits_error(ref, prompt_logits(model, ps))["rel_err"] < 1e-5  # the same function
    fp8 = torch.float8_e4m3fn
    original = logits_error(ref, prompt_logits(base, ps, kv_dtype=fp8))
    unscaled = logits_error(ref, prompt_logits(model, ps, kv_dtype=fp8))
    set_kv_scales(model, big_k, big_v)
    scaled = logits_error(ref, prompt_logits(model, ps, kv_dtype=fp8))
    print(
        f"\nK x{big_k:g}, V x{big_v:g}: rel error {unscaled['rel_err']:.4f} with scale 1.0, {scaled['rel_err']:.4f} with the"
        f" scales (original model {original['rel_err']:.4f}); top-1 {unscaled['top1']:.3f} / {scaled['top1']:.3f}"
    )
    assert abs(scaled["rel_err"] - original["rel_err"]) < 0.1 * original["rel_err"]
    assert scaled["rel_err"] < TF_REL_ERROR and scaled["top1"] > TF_MIN_TOP1
    assert unscaled["rel_err"] > 5 * scaled["rel_err"]


def test_kv_cache_only_checkpoint_serves_with_its_scales(tiny_llama: Path, tmp_path: Path) -> None:
    """A KV-cache-only checkpoint (compressed-tensors `kv_cache_scheme` without `config_groups`: plain
    weights, one k_scale / v_scale per layer) through the engine on the CPU with kv_cache_dtype fp8,
    prefill and decode steps: the tiny Llama rescaled so that K is 1,024x and V 2,048x larger (the
    same function), with those scales, gives the original checkpoint's fp8-cache logits at every
    step; the same weights without the scales saturate K and V and are far off."""
    import json
    import shutil

    from inferfleet.worker.quant.calibrate import KV_CACHE_SCHEME
    from inferfleet.worker.tiny import save_safetensors
    from safetensors.torch import load_file

    big_k, big_v = 1024.0, 2048.0
    tensors = kv_rescaled_tensors(load_file(str(tiny_llama / "model.safetensors")), big_k, big_v)

    def checkpoint(dst: Path, scales: bool) -> Path:
        shutil.copytree(tiny_llama, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        out = dict(tensors)
        cfg = json.loads((dst / "config.json").read_text())
        if scales:
            out |= kv_scale_tensors(cfg["num_hidden_layers"], big_k, big_v)
            scheme = dict(KV_CACHE_SCHEME)
            cfg["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": scheme}
            (dst / "config.json").write_text(json.dumps(cfg))
        save_safetensors(out, dst)
        return dst

    ps = prompts(3, n=6)
    want_tokens, want, _ = run(tiny_llama, "fp8", ps)
    got_tokens, got, eng = run(checkpoint(tmp_path / "kv-only", True), "fp8", ps)
    assert eng.config.quantization == "none" and eng.config.model_config.kv_cache_scales
    attn = eng.runner.model.model.layers[1].self_attn
    assert (attn.k_scale, attn.v_scale) == (big_k, big_v)
    _, off, _ = run(checkpoint(tmp_path / "no-scales", False), "fp8", ps)
    errs = []
    for a, b, rows_w, rows_g in zip(want_tokens, got_tokens, want, got):
        k = min(common_prefix(a, b) + 1, len(rows_w))
        errs += [float((g - w).norm() / w.norm()) for g, w in zip(rows_g[:k], rows_w[:k])]
    off_err = min(float((o[0] - w[0]).norm() / w[0].norm()) for o, w in zip(off, want))
    print(
        f"\nKV-cache-only checkpoint: {len(errs)} rows, max rel {max(errs):.2e}; without the scales {off_err:.3f}+"
    )
    assert len(errs) > len(ps) and max(errs) < 1e-4
    assert off_err > 0.1


def test_torch_write_path_applies_the_scale() -> None:
    """write_kv with a cache scale stores value / scale (times the float32 reciprocal), clamped and
    rounded like unscaled values: 960 / 4 = 240 is an e4m3 value, 4000 / 4 saturates at 448."""
    kc = torch.zeros(2, 4, 1, 3, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    k = torch.tensor([[[960.0, -4000.0, 0.3]]])
    write_kv(k, k * 10, kc, vc, torch.tensor([2]), kv_scale=(4.0, 40.0))
    got_k, got_v = kc.view(-1, 1, 3)[2].float(), vc.view(-1, 1, 3)[2].float()
    assert got_k.tolist() == [[240.0, -KV_FP8_MAX, 0.078125]]  # 0.075 rounds to the nearest e4m3
    assert torch.equal(got_v, got_k)


def test_cuda_below_compute_capability_8_9_is_refused(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton's e4m3 conversions need sm_89+: an A100 (8.0) is refused before anything is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(InvalidRequestError, match=r"compute capability >= 8\.9") as e:
        EngineConfig(model=str(tiny_llama), device="cuda", kv_cache_dtype="fp8")
    assert e.value.param == "kv_cache_dtype"
    assert EngineConfig(model=str(tiny_llama), device="cuda").kv_cache_dtype == "auto"  # auto is fine there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    h100 = EngineConfig(model=str(tiny_llama), device="cuda", kv_cache_dtype="fp8")
    assert h100.kv_torch_dtype == torch.float8_e4m3fn and h100.dtype == "bfloat16"
