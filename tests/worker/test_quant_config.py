"""Which quantization a worker runs, and the combinations it refuses (param `quantization`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from inferfleet.worker import cli
from inferfleet.worker.config import QUANTIZATIONS, EngineConfig
from inferfleet.worker.errors import InvalidRequestError, UnsupportedModelError
from inferfleet.worker.quant.spec import (
    QuantConfig,
    checkpoint_kv_scales,
    checkpoint_quantization,
    resolve_quantization,
)
from quant_helpers import fp8_quantization_config

GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
FP8_QC = fp8_quantization_config()
H100 = (9, 0)


def resolve(
    requested: str, qc: dict[str, Any] | None, device: str = "cpu", cap: Any = None, dtype: str = "float32"
):  # type: ignore[no-untyped-def]
    return resolve_quantization(requested, qc, device, cap, dtype)


def test_methods_listed() -> None:
    assert QUANTIZATIONS == ("none", "fp8", "int8", "gptq")


def test_plain_checkpoint() -> None:
    assert resolve("none", None) is None
    assert resolve("int8", None) == QuantConfig("int8", from_checkpoint=False)
    assert resolve("fp8", None, "cuda", H100, "bfloat16") == QuantConfig("fp8", from_checkpoint=False)


def test_checkpoints_are_detected_with_quantization_none() -> None:
    q = resolve("none", GPTQ_QC)
    assert q == QuantConfig("gptq", True, bits=4, group_size=128, desc_act=True, sym=True, zero_offset=1)
    assert resolve("gptq", GPTQ_QC) == q
    v2 = resolve("none", {**GPTQ_QC, "checkpoint_format": "gptq_v2", "sym": False, "desc_act": False})
    assert (v2.zero_offset, v2.sym, v2.desc_act) == (0, False, False)
    fp8 = QuantConfig("fp8", from_checkpoint=True, targets=("Linear",), ignore=("lm_head",))
    assert resolve("none", FP8_QC, "cuda", H100, "bfloat16") == fp8
    assert resolve("fp8", FP8_QC, "cuda", (8, 9), "float16") == fp8


@pytest.mark.parametrize(
    ("requested", "qc", "device", "cap", "dtype", "message"),
    [
        ("gptq", None, "cpu", None, "float32", "quantization gptq needs a GPTQ checkpoint"),
        ("gptq", FP8_QC, "cuda", H100, "bfloat16", "but this checkpoint is fp8"),
        ("int8", GPTQ_QC, "cpu", None, "float32", "int8 cannot re-quantize a gptq checkpoint"),
        ("fp8", GPTQ_QC, "cuda", H100, "bfloat16", "fp8 cannot re-quantize a gptq checkpoint"),
        ("fp8", None, "cpu", None, "float32", "quantization must be one of ('none', 'int8', 'gptq')"),
        ("none", FP8_QC, "cpu", None, "float32", "the checkpoint is FP8"),
        ("fp8", None, "cuda", (8, 0), "bfloat16", "this GPU has 8.0"),
        ("fp8", None, "cuda", H100, "float32", "fp8 needs dtype bfloat16 or float16"),
        ("awq", None, "cpu", None, "float32", "quantization must be one of"),
    ],
)
def test_impossible_combinations_are_refused(
    requested: str, qc: Any, device: str, cap: Any, dtype: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as e:
        resolve(requested, qc, device, cap, dtype)
    assert e.value.param == "quantization" and message in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
        ({**GPTQ_QC, "bits": 3}, "GPTQ bits=3"),
        ({**GPTQ_QC, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        (
            {**FP8_QC, "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}},
            "outside format pack-quantized only 8-bit weights are read",
        ),
        (
            {**FP8_QC, "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}}},
            "INT8 weights must be stored as int8 tensors (format int-quantized)",
        ),
        (
            {**FP8_QC, "format": "int-quantized", "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": False}}}},
            "INT8 weights must be symmetric",
        ),
        (
            {**FP8_QC, "format": "int-quantized", "config_groups": {
                "a": {"weights": {"type": "int", "num_bits": 8, "strategy": "channel"}},
                "b": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}}},
            "mix FP8 and INT8",
        ),
        (
            {
                **FP8_QC,
                "config_groups": {
                    "g": {
                        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                        "input_activations": {"type": "float", "num_bits": 8, "dynamic": False, "strategy": "token"},
                    }
                },
            },
            "static activation scales must be per tensor",
        ),
        (
            {
                **FP8_QC,
                "config_groups": {
                    "g": {
                        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                        "input_activations": {"type": "int", "num_bits": 8, "dynamic": True},
                    }
                },
            },
            "activations must be FP8",
        ),
        ({**FP8_QC, "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "group"}}}}, "per channel or per tensor"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "block-wise weight scales"),
        ({"quant_method": "fp8", "activation_scheme": "per-channel"}, "activation_scheme must be static or dynamic"),
    ],
)  # fmt: skip
def test_unsupported_checkpoint_layouts(qc: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checkpoint_quantization(qc)


def _with_qc(src: Path, dst: Path, qc: dict[str, Any]) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_engine_config_resolves_and_passes_it_to_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    e = EngineConfig(model=str(tiny_llama), device="cpu", quantization="int8")
    assert e.quantization == "int8" and e.model_config.quant == QuantConfig("int8", False)
    plain = EngineConfig(model=str(tiny_llama), device="cpu")
    assert plain.quantization == "none" and plain.model_config.quant is None
    gptq_dir = _with_qc(tiny_llama, tmp_path / "g", GPTQ_QC)
    auto = EngineConfig(model=str(gptq_dir), device="cpu")
    assert auto.quantization == "gptq" and auto.model_config.quant is not None
    assert auto.model_config.quant.desc_act


def test_cli_refusals_are_clean_startup_errors(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp8_dir = _with_qc(tiny_llama, tmp_path / "f", FP8_QC)
    cases = [
        (tiny_llama, ["--quantization", "fp8"], "FP8 runs only on NVIDIA GPUs of compute capability >= 8.9"),
        (tiny_llama, ["--quantization", "gptq"], "quantization gptq needs a GPTQ checkpoint"),
        (fp8_dir, [], "the checkpoint is FP8"),
    ]
    for model, args, message in cases:
        rc = cli.main(["serve", "--model", str(model), "--device", "cpu", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err
        assert "Traceback" not in err


def test_cli_refuses_abbreviated_flags(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flags are taken by their full names only: the operator puts extraArgs after the flags it
    manages and refuses those names there, so "--max-model=99" must not pass as --max-model-len."""
    for flag in ("--max-model=99", "--kv-cache=fp8", "--served=other", "--quant=fp8"):
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--model", str(tiny_llama), "--device", "cpu", flag])
        assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--log=DEBUG", "serve", "--model", str(tiny_llama)])
    assert "unrecognized arguments: --log=DEBUG" in capsys.readouterr().err


def test_gptq_checkpoint_with_quantized_lm_head() -> None:
    """GPTQModel's `lm_head: true` (lm_head stored quantized too) is read, and said in describe()."""
    qc = checkpoint_quantization({**GPTQ_QC, "lm_head": True})
    assert qc is not None and qc.lm_head and "lm_head quantized" in qc.describe()
    plain = checkpoint_quantization(GPTQ_QC)
    assert plain is not None and not plain.lm_head and "lm_head" not in plain.describe()


@pytest.mark.parametrize(
    ("targets", "ignore", "quantized"),
    [
        (["Linear"], ["lm_head"], False),  # llm-compressor's default recipe
        (["Linear"], [], True),
        (["Linear"], ["re:.*lm_head"], False),
        (["re:.*proj$"], [], False),  # the groups do not target lm_head
        (["re:.*proj$", "lm_head"], [], True),
        (["Linear"], ["re:lm_"], False),  # "re:" patterns match from the start, as re.match does
        (["re:lm"], [], True),
        (None, [], False),  # a group without targets targets nothing
    ],
)
def test_fp8_checkpoint_lm_head_follows_targets_and_ignore(
    targets: list[str] | None, ignore: list[str], quantized: bool
) -> None:
    qc = fp8_quantization_config()
    qc["ignore"] = ignore
    if targets is None:
        del qc["config_groups"]["group_0"]["targets"]
    else:
        qc["config_groups"]["group_0"]["targets"] = targets
    got = checkpoint_quantization(qc)
    assert got is not None and got.method == "fp8" and got.lm_head is quantized
    assert ("lm_head quantized" in got.describe()) is quantized


def test_quantize_lm_head_at_load() -> None:
    """fp8 / int8 of a plain checkpoint may quantize lm_head too; the answer says so."""
    q = resolve_quantization("int8", None, "cpu", None, "float32", quantize_lm_head=True)
    assert q == QuantConfig("int8", from_checkpoint=False, lm_head=True)
    assert q.describe() == "int8 (quantized at load, lm_head quantized)"
    q = resolve_quantization("fp8", None, "cuda", H100, "bfloat16", quantize_lm_head=True)
    assert q == QuantConfig("fp8", from_checkpoint=False, lm_head=True)
    assert resolve("int8", None) == QuantConfig("int8", from_checkpoint=False)  # off by default


@pytest.mark.parametrize(
    ("requested", "qc", "tied", "message"),
    [
        ("none", None, False, "here quantization is none"),
        ("none", GPTQ_QC, False, "this gptq checkpoint's quantization_config decides whether lm_head"),
        ("fp8", FP8_QC, False, "this fp8 checkpoint's quantization_config decides"),
        ("int8", None, True, "ties it to the embedding (tie_word_embeddings)"),
    ],
)
def test_quantize_lm_head_refusals(
    requested: str, qc: dict[str, Any] | None, tied: bool, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as e:
        resolve_quantization(
            requested, qc, "cuda", H100, "bfloat16", quantize_lm_head=True, tied_embeddings=tied
        )
    assert message in str(e.value) and e.value.param == "quantize_lm_head"


def test_quantize_lm_head_flag(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--quantize-lm-head reaches EngineConfig; a tied model or no quantization is a clean refusal."""
    untied = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", quantization="int8", quantize_lm_head=True
    )
    assert untied.model_config.quant == QuantConfig("int8", from_checkpoint=False, lm_head=True)
    cases = [
        (tiny_models["llama"], [], "here quantization is none"),
        (tiny_models["qwen2"], ["--quantization", "int8"], "tie_word_embeddings"),
    ]
    for model, args, message in cases:
        rc = cli.main(["serve", "--model", str(model), "--device", "cpu", "--quantize-lm-head", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize(
    ("targets", "ignore", "module", "quantized"),
    [
        (["Linear"], ["lm_head"], "model.layers.0.mlp.down_proj", True),
        (["Linear"], ["lm_head", "model.layers.0.mlp.down_proj"], "model.layers.0.mlp.down_proj", False),
        (["Linear"], ["lm_head", "model.layers.0.mlp.down_proj"], "model.layers.1.mlp.down_proj", True),
        (["Linear"], ["re:.*mlp"], "model.layers.5.mlp.gate_proj", False),
        (["Linear"], ["re:.*mlp"], "model.layers.5.self_attn.q_proj", True),
        (["re:.*self_attn"], [], "model.layers.5.mlp.up_proj", False),  # not targeted
        (["re:.*self_attn"], [], "model.layers.5.self_attn.o_proj", True),
    ],
)
def test_fp8_checkpoint_projections_follow_targets_and_ignore(
    targets: list[str], ignore: list[str], module: str, quantized: bool
) -> None:
    qc = fp8_quantization_config()
    qc["ignore"] = ignore
    qc["config_groups"]["group_0"]["targets"] = targets
    got = checkpoint_quantization(qc)
    assert got is not None and got.stores_quantized(module) is quantized
    # GPTQ checkpoints and quantization at load quantize every projection
    assert QuantConfig("fp8", from_checkpoint=False).stores_quantized(module)
    assert resolve("none", GPTQ_QC).stores_quantized(module)


def test_fp8_checkpoint_with_static_activation_scales() -> None:
    """llm-compressor's static FP8 scheme (per-tensor input_scale): accepted; the scales are read and
    not applied (activations get per-token scales), and describe() says so."""
    qc = fp8_quantization_config("tensor")
    qc["config_groups"]["group_0"]["input_activations"] = {
        "type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True
    }  # fmt: skip
    got = checkpoint_quantization(qc)
    assert got is not None and got.static_input_scales
    assert "static input scales not applied" in got.describe()
    dynamic = checkpoint_quantization(fp8_quantization_config("tensor"))
    assert dynamic is not None and not dynamic.static_input_scales


def test_autofp8_checkpoints() -> None:
    """AutoFP8's `quant_method: fp8` configs: static or dynamic activations, lm_head left out unless
    `ignored_layers` leaves it in."""
    static = checkpoint_quantization(
        {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    )
    assert static is not None and static.method == "fp8" and static.from_checkpoint
    assert static.static_input_scales and not static.lm_head
    assert static.stores_quantized("model.layers.0.mlp.down_proj")
    dynamic = checkpoint_quantization({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert dynamic is not None and not dynamic.static_input_scales and not dynamic.lm_head
    everything = checkpoint_quantization({"quant_method": "fp8", "ignored_layers": []})
    assert everything is not None and everything.lm_head
    some = checkpoint_quantization(
        {"quant_method": "fp8", "ignored_layers": ["lm_head", "model.layers.3.mlp.down_proj"]}
    )
    assert some is not None and not some.stores_quantized("model.layers.3.mlp.down_proj")


def test_fp8_checkpoint_with_kv_cache_scales() -> None:
    """A compressed-tensors kv_cache_scheme (FP8 KV, per-tensor k_scale / v_scale): accepted, the
    scales set on the layers for an fp8 cache, and said, also without quantized weights; a non-FP8
    KV scheme is refused."""
    qc = fp8_quantization_config()
    qc["kv_cache_scheme"] = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}
    got = checkpoint_quantization(qc)
    assert (
        got is not None
        and got.kv_scales
        and "KV cache scales (applied with kv_cache_dtype fp8)" in got.describe()
    )
    plain = checkpoint_quantization(fp8_quantization_config())
    assert plain is not None and not plain.kv_scales
    assert checkpoint_kv_scales(qc) and not checkpoint_kv_scales(fp8_quantization_config())
    # a KV-cache-only checkpoint (llm-compressor's kv_cache_scheme recipe without config_groups):
    # plain weights, and the KV cache scales
    kv_only = {"quant_method": "compressed-tensors", "kv_cache_scheme": qc["kv_cache_scheme"]}
    assert checkpoint_quantization(kv_only) is None and checkpoint_kv_scales(kv_only)
    with pytest.raises(UnsupportedModelError, match="has no config_groups"):
        checkpoint_quantization({"quant_method": "compressed-tensors"})
    for bad in ({"type": "int", "num_bits": 8}, {"type": "float", "num_bits": 8, "strategy": "attn_head"}):
        qc["kv_cache_scheme"] = bad
        with pytest.raises(UnsupportedModelError, match="kv_cache_scheme must be FP8 per tensor"):
            checkpoint_quantization(qc)
    auto = checkpoint_quantization({"quant_method": "fp8", "kv_cache_scheme": "static"})
    assert auto is not None and auto.kv_scales
    with pytest.raises(UnsupportedModelError, match="AutoFP8 kv_cache_scheme must be static"):
        checkpoint_quantization({"quant_method": "fp8", "kv_cache_scheme": "dynamic"})


def test_a_compressed_tensors_config_that_targets_nothing_quantizes_nothing() -> None:
    qc = fp8_quantization_config()
    del qc["config_groups"]["group_0"]["targets"]
    got = checkpoint_quantization(qc)
    assert got is not None and got.targets == () and not got.lm_head
    assert not got.stores_quantized("model.layers.0.mlp.down_proj")


def int8_quantization_config() -> dict[str, Any]:
    """llm-compressor's W8A8 INT8 scheme in compressed-tensors (int8 codes, per-channel scales,
    dynamic per-token int8 activations)."""
    qc = fp8_quantization_config()
    qc["format"] = "int-quantized"
    group = qc["config_groups"]["group_0"]
    group["weights"]["type"] = group["input_activations"]["type"] = "int"
    return qc


def test_int8_compressed_tensors_checkpoints() -> None:
    """Detected as int8 from the checkpoint (CPU workers included); fp8 refuses them, int8 takes them."""
    got = resolve("none", int8_quantization_config())
    assert got is not None and got.method == "int8" and got.from_checkpoint and not got.lm_head
    assert resolve("int8", int8_quantization_config()) == got
    with pytest.raises(InvalidRequestError, match="fp8 cannot re-quantize an int8 checkpoint"):
        resolve("fp8", int8_quantization_config(), "cuda", H100, "bfloat16")
    with pytest.raises(InvalidRequestError, match="quantization_config decides"):
        resolve_quantization(
            "int8", int8_quantization_config(), "cpu", None, "float32", quantize_lm_head=True
        )


def pack_quantized_config(**weights: Any) -> dict[str, Any]:
    """llm-compressor's W4A16 config (compressed-tensors pack-quantized), `weights` overriding."""
    w = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True} | weights
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None}},
    }


def test_compressed_tensors_pack_quantized_resolves_to_gptq() -> None:
    got = resolve("none", pack_quantized_config(actorder="group"))
    assert got is not None and got.method == "gptq" and got.layout == "compressed-tensors"
    assert (got.bits, got.group_size, got.desc_act, got.sym, got.zero_offset) == (4, 128, True, True, 0)
    assert "compressed-tensors pack-quantized" in got.describe()
    assert resolve("gptq", pack_quantized_config()) == resolve("none", pack_quantized_config())
    channel = resolve("none", pack_quantized_config(strategy="channel", num_bits=8, group_size=None))
    assert channel is not None and (channel.bits, channel.group_size) == (8, -1)
    assert not resolve("none", pack_quantized_config(actorder="weight")).desc_act  # stored in order
    # compressed-tensors' aliases: "dynamic" and true mean "group", "static" (llm-compressor's
    # GPTQ default) means "weight"
    for alias, desc_act in (("dynamic", True), (True, True), ("static", False)):
        assert resolve("none", pack_quantized_config(actorder=alias)).desc_act is desc_act
    qc = pack_quantized_config()
    qc["kv_cache_scheme"] = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}
    assert resolve("none", qc).kv_scales


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"symmetric": False}, "must be symmetric"),
        ({"num_bits": 3}, "must be int of (2, 4, 8) bits"),
        ({"strategy": "tensor"}, "per group or per channel"),
        ({"group_size": None}, "strategy group needs a group_size"),
        ({"actorder": "bogus"}, "actorder 'bogus' is not supported"),
    ],
)
def test_compressed_tensors_pack_quantized_refusals(weights: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checkpoint_quantization(pack_quantized_config(**weights))
    qc = pack_quantized_config()
    qc["config_groups"]["group_0"]["input_activations"] = {"type": "int", "num_bits": 8, "dynamic": True}
    with pytest.raises(UnsupportedModelError, match="weight-only W4A16 / W8A16 are"):
        checkpoint_quantization(qc)


def test_widens_above_tells_where_a_layer_widens_its_weights() -> None:
    """LinearMethod.widens_above (what bounds cuda_graphs.MixedGraphs' token counts): INT8 and GPTQ
    widen above kernels.MAX_M rows, FP8 never where _scaled_mm takes its shape, plain layers never."""
    from inferfleet.worker.kernels import MAX_M
    from inferfleet.worker.layers.linear import Linear

    def layer(quant: QuantConfig | None, n: int = 64, k: int = 64) -> Linear:
        return Linear(k, [n], quant=quant)

    assert layer(None).method is None
    for q in (QuantConfig("int8", False), QuantConfig("gptq", True, bits=4, group_size=32)):
        lin = layer(q)
        assert lin.method.widens_above(lin) == MAX_M
    fp8 = layer(QuantConfig("fp8", False))
    assert fp8.method.widens_above(fp8) is None
    odd = layer(QuantConfig("fp8", False), n=40, k=72)  # _scaled_mm needs multiples of 16
    assert odd.method.widens_above(odd) is not None
