"""`inferfleet-worker quantize`: write a GPTQ checkpoint (AutoGPTQ v1 layout) from a plain one.

GPTQ needs each linear layer's input statistics on calibration text, with the layers before it
already quantized. The model runs one decoder layer at a time over all calibration sequences
(dense causal attention on contiguous tensors, float32), in four passes per layer, "true
sequential" as AutoGPTQ does:

    h -> norm -> [qkv] -> attention -> [o] -> + h -> norm -> [gate_up] -> silu * up -> [down] -> + h2

pass 1 accumulates H for qkv from the normed hidden states and quantizes qkv; pass 2 recomputes
with the quantized qkv and accumulates H for o; and so on. The quantized layer's outputs feed the
next layer. Each layer's reconstruction error ||W X - Q X||^2 is reported next to round-to-nearest
with the same grid. `--lm-head` quantizes lm_head last, from the final norm's outputs of the
quantized decoder (GPTQModel's lm_head=True). `--method rtn` skips calibration (round to nearest, same layout): fast enough for
8B-sized checkpoints in the GPU benchmark. `--method fp8` / `--method int8` write an FP8 / INT8
checkpoint in the compressed-tensors layout llm-compressor's FP8_DYNAMIC / W8A8 INT8 schemes write
(8-bit codes with per-channel scales, dynamic per-token activations; lm_head too with `--lm-head`),
one tensor at a time: what `--quantization fp8|int8` would compute at load, stored at half the bytes
of a bf16 checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..config import ModelConfig
from ..errors import InvalidRequestError
from ..layers.attention import qkv_heads
from ..loader import SafetensorsFile, iter_weights, safetensors_files
from .evaluate import build_model
from .fp8 import FP8_MAX, quantize_weight_fp8
from .gptq import pack_int32
from .gptq_quantizer import QuantResult, gptq_quantize, reconstruction_error, rtn_quantize
from .int8 import quantize_weight_int8

log = logging.getLogger(__name__)

# our merged module -> the checkpoint modules stacked in it, in order
_SPLITS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
_QUANTIZED = tuple(m for parts in _SPLITS.values() for m in parts)
# the methods that write 8-bit codes with per-channel scales (compressed-tensors), and how they
# quantize a weight: as --quantization fp8 / int8 would at load
ROW_SCALED = {"fp8": quantize_weight_fp8, "int8": quantize_weight_int8}


@dataclass(frozen=True)
class QuantizeSpec:
    method: str = "gptq"  # "gptq" | "rtn"
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    damp: float = 0.01
    nsamples: int = 128
    seqlen: int = 2048
    block_size: int = 128
    batch_size: int = 8  # calibration sequences per forward chunk
    seed: int = 0
    lm_head: bool = False  # quantize lm_head too (GPTQModel's lm_head=True), from the final norm's outputs
    # fp8 / int8: also calibrate per-layer FP8 KV cache scales (a compressed-tensors kv_cache_scheme);
    # method kv writes only those, beside the weights as they are
    kv_cache_scales: bool = False

    def validate(self) -> None:
        if self.method not in ("gptq", "rtn", *ROW_SCALED, "kv"):
            raise InvalidRequestError("method must be gptq, rtn, fp8, int8 or kv", param="method")
        if self.method == "kv" and self.lm_head:
            raise InvalidRequestError(
                "--lm-head quantizes weights; method kv only adds KV cache scales", param="lm_head"
            )
        if self.bits not in (2, 4, 8):
            raise InvalidRequestError("bits must be 2, 4 or 8", param="bits")
        if self.group_size != -1 and self.group_size < 1:
            raise InvalidRequestError("group_size must be -1 or positive", param="group_size")
        if not 0 < self.damp < 1:
            raise InvalidRequestError("damp must be in (0, 1)", param="damp")
        if self.act_order and self.method != "gptq":
            raise InvalidRequestError("act-order needs calibration (method gptq)", param="act_order")
        if self.kv_cache_scales and self.method not in ROW_SCALED:
            raise InvalidRequestError(
                "kv-cache-scales go into a compressed-tensors checkpoint: methods fp8 and int8",
                param="kv_cache_scales",
            )
        if self.method in (*ROW_SCALED, "kv"):  # 8-bit codes with per-channel scales, or none: no grid
            gptq_only = {"bits": 4, "group_size": 128, "sym": True}
            for name, default in gptq_only.items():
                if getattr(self, name) != default:
                    raise InvalidRequestError(
                        f"{name} applies to methods gptq and rtn, not {self.method}", param=name
                    )


@dataclass
class LayerReport:
    name: str
    gptq_error: float  # ||W X - Q X||^2 up to a constant (trace form); for rtn runs, equal to rtn_error
    rtn_error: float
    tokens: int


# -- calibration data ------------------------------------------------------------------------------


def calibration_samples(
    text: str, model_dir: str | Path, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets of the tokenized text -> [S, T] int64."""
    from ..tokenizer import Tokenizer

    ids = Tokenizer(model_dir).encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise InvalidRequestError("the calibration text is (almost) empty", param="calibration")
    if len(ids) < seqlen:
        log.warning(
            "calibration text has %d tokens, fewer than seqlen %d: using %d", len(ids), seqlen, len(ids)
        )
        seqlen = len(ids)
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen + 1) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


# -- the layer-by-layer dense forward -------------------------------------------------------------


def _attend(attn: Any, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of [S, T, (H + 2 KVH) D] -> [S, T, H D], as the engine computes it."""
    s, t = qkv.shape[:2]
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = qkv_heads(attn, positions.repeat(s), qkv.reshape(s * t, -1))
    q, k, v = (z.reshape(s, t, -1, d).transpose(1, 2) for z in (q, k, v))  # [S, heads, T, D]
    if h != kvh:
        k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
    return o.transpose(1, 2).reshape(s, t, h * d)


# the inputs layer_forward stops at: each quantized module in forward order, then the layer's output
_STAGES = (*_SPLITS, "out")


def layer_forward(layer: Any, h: torch.Tensor, positions: torch.Tensor, upto: str) -> torch.Tensor:
    """Run decoder layer `layer` on h [S, T, hidden] up to the input of `upto` (or its output)."""
    x = layer.input_layernorm(h)
    if upto == _STAGES[0]:
        return x
    a = _attend(layer.self_attn, layer.self_attn.qkv_proj(x), positions)
    if upto == _STAGES[1]:
        return a
    h2 = h + layer.self_attn.o_proj(a)
    x2 = layer.post_attention_layernorm(h2)
    if upto == _STAGES[2]:
        return x2
    gate, up = layer.mlp.gate_up_proj(x2).chunk(2, dim=-1)
    act = F.silu(gate) * up
    if upto == _STAGES[3]:
        return act
    return h2 + layer.mlp.down_proj(act)


def dense_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [S, T, V] through the same dense path (checks the calibration forward)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    h = model.model.embed_tokens(ids).float()
    for layer in model.model.layers:
        h = layer_forward(layer, h, positions, "out")
    return model.lm_head(model.model.norm(h)).float()


# -- GPTQ over a model ------------------------------------------------------------------------------


def _load_dense_model(model_dir: str | Path, device: torch.device, max_position: int) -> Any:
    return build_model(model_dir, None, device, torch.float32, max_position=max_position)


# the kv_cache_scheme of the checkpoints `--kv-cache-scales` writes: compressed-tensors' static FP8 per
# tensor, one k_scale and one v_scale per attention layer
KV_CACHE_SCHEME = {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True, "dynamic": False}


def kv_cache_scales(
    model_dir: str | Path, samples: torch.Tensor, device: torch.device, batch_size: int
) -> dict[int, tuple[float, float]]:
    """Per attention layer, (k_scale, v_scale) = (max |K|, max |V|) / 448 over the calibration samples:
    K after the q/k norm and rotary, as the cache receives it, so that the largest value seen lands
    on e4m3's largest (layers/attention.to_fp8_cache divides by the scale). From the unquantized model
    (float32), layer by layer; a layer whose K or V is all zeros gets 1.0."""
    model = _load_dense_model(model_dir, device, max(samples.shape[1], 1))
    scales: dict[int, tuple[float, float]] = {}
    with torch.inference_mode():
        positions = torch.arange(samples.shape[1], device=device)
        hidden = [model.model.embed_tokens(c).float() for c in samples.to(device).split(batch_size)]
        for li, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            k_max = v_max = 0.0
            for h in hidden:
                s, t = h.shape[:2]
                qkv = attn.qkv_proj(layer.input_layernorm(h)).reshape(s * t, -1)
                _, k, v = qkv_heads(attn, positions.repeat(s), qkv)
                k_max, v_max = max(k_max, float(k.abs().amax())), max(v_max, float(v.abs().amax()))
            scales[li] = tuple(m / FP8_MAX if m > 0 else 1.0 for m in (k_max, v_max))  # type: ignore[assignment]
            hidden = [layer_forward(layer, h, positions, "out") for h in hidden]
    log.info("KV cache scales of %d layers from %d calibration sequences", len(scales), samples.shape[0])
    return scales


# (module name, its result, the module's output_sizes: the checkpoint tensors stacked in it)
ResultSink = Callable[[str, QuantResult, list[int]], None]


def check_lm_head(spec: QuantizeSpec, mc: ModelConfig) -> None:
    """`--lm-head` only where the checkpoint can hold a quantized lm_head of its own: not tied to the
    embedding, and a vocabulary that packs into whole int32 words along N (qzeros)."""
    if not spec.lm_head:
        return
    if mc.tie_word_embeddings:
        raise InvalidRequestError(
            "--lm-head: this model ties lm_head to the token embedding (tie_word_embeddings), which stays "
            "unquantized; quantize without --lm-head",
            param="lm_head",
        )
    per_word = 32 // spec.bits
    if spec.method not in ROW_SCALED and mc.vocab_size % per_word:
        raise InvalidRequestError(
            f"--lm-head: the vocabulary ({mc.vocab_size}) is not a multiple of {per_word}, so {spec.bits}-bit "
            "zeros cannot be packed along it; quantize without --lm-head",
            param="lm_head",
        )


def gptq_model(
    model_dir: str | Path,
    samples: torch.Tensor,
    spec: QuantizeSpec,
    device: torch.device,
    sink: ResultSink | None = None,
) -> tuple[dict[str, QuantResult], list[LayerReport]]:
    """Quantize every decoder projection (and lm_head with `spec.lm_head`), keyed by our module names
    (`model.layers.{i}.self_attn.qkv_proj`, ..., `lm_head`); returns the results (unless `sink` takes
    each one as it is done, so a large model never holds them all) and the per-layer error report."""
    check_lm_head(spec, ModelConfig.from_pretrained(model_dir))  # before the weights are loaded
    model = _load_dense_model(model_dir, device, max(samples.shape[1], 1))
    with torch.inference_mode():
        return _gptq_layers(model, samples.to(device), spec, device, sink)


def _gptq_layers(
    model: Any, samples: torch.Tensor, spec: QuantizeSpec, device: torch.device, sink: ResultSink | None
) -> tuple[dict[str, QuantResult], list[LayerReport]]:
    positions = torch.arange(samples.shape[1], device=device)
    chunks = list(samples.split(spec.batch_size))
    hidden = [model.model.embed_tokens(c).float() for c in chunks]  # per chunk [s, T, hidden]
    results: dict[str, QuantResult] = {}
    reports: list[LayerReport] = []
    for li, layer in enumerate(model.model.layers):
        t0 = time.perf_counter()
        for stage in _STAGES[:-1]:
            linear = layer.get_submodule(stage)
            inputs = (layer_forward(layer, h, positions, stage) for h in hidden)
            res, report = _quantize_linear(f"model.layers.{li}.{stage}", linear, inputs, spec)
            _keep(res, report, linear, sink, results, reports)
        hidden = [layer_forward(layer, h, positions, "out") for h in hidden]
        log.info("layer %d quantized in %.2fs", li, time.perf_counter() - t0)
    if spec.lm_head:  # its inputs: the final norm of the quantized decoder's outputs
        res, report = _quantize_linear("lm_head", model.lm_head, (model.model.norm(h) for h in hidden), spec)
        _keep(res, report, model.lm_head, sink, results, reports)
    return results, reports


def _quantize_linear(
    name: str, linear: Any, inputs: Iterable[torch.Tensor], spec: QuantizeSpec
) -> tuple[QuantResult, LayerReport]:
    """GPTQ (or RTN) of one linear layer from its calibration inputs, with both errors."""
    kdim = linear.in_features
    hess = torch.zeros((kdim, kdim), device=linear.weight.device)
    ntok = 0
    for x in inputs:
        x = x.reshape(-1, kdim).float()
        hess.addmm_(x.t(), x)
        ntok += x.shape[0]
    hess *= 2.0 / ntok
    w = linear.weight.data.float()
    rtn = rtn_quantize(w, spec.bits, spec.group_size, spec.sym)
    rtn_err = reconstruction_error(w, rtn.dequant, hess)
    if spec.method == "gptq":
        res = gptq_quantize(
            w, hess, spec.bits, spec.group_size, spec.sym, spec.act_order, spec.damp, spec.block_size
        )
        err = reconstruction_error(w, res.dequant, hess)
    else:
        res, err = rtn, rtn_err
    return res, LayerReport(name, err, rtn_err, ntok)


def _keep(
    res: QuantResult,
    report: LayerReport,
    linear: Any,
    sink: ResultSink | None,
    results: dict[str, QuantResult],
    reports: list[LayerReport],
) -> None:
    """Hand a quantized layer on (sink or results), and put its quantized weights in the model:
    later stages and layers see the quantized layer."""
    if sink is not None:
        sink(report.name, res, linear.output_sizes)
    else:
        results[report.name] = res
    reports.append(report)
    linear.weight.data.copy_(res.dequant)


# -- writing the checkpoint -----------------------------------------------------------------------


def gptq_tensors(res: QuantResult, bits: int, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """One layer's QuantResult -> its AutoGPTQ tensors (v1: zeros stored minus one)."""
    maxq = 2**bits - 1
    return {
        "qweight": pack_int32(res.codes.t(), bits, 0).cpu(),  # [K / p, N]
        "qzeros": pack_int32((res.zeros - zero_offset) & maxq, bits, 1).cpu(),  # [G, N / p]
        "scales": res.scales.to(torch.float16).cpu(),  # [G, N]
        "g_idx": res.g_idx.to("cpu", torch.int32, copy=True),  # [K]
    }


def _split(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    out, lo = [], 0
    for n in sizes:
        out.append(
            QuantResult(
                res.codes[lo : lo + n], res.scales[:, lo : lo + n], res.zeros[:, lo : lo + n], res.g_idx,
                res.dequant[lo : lo + n],
            )
        )  # fmt: skip
        lo += n
    return out


def quantization_config(spec: QuantizeSpec) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.act_order,
        "sym": spec.sym,
        "damp_percent": spec.damp,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "lm_head": spec.lm_head,
        "quantizer": ["inferfleet", spec.method],
    }


def row_scaled_quantization_config(method: str, lm_head: bool) -> dict[str, Any]:
    """config.json's quantization_config of the checkpoints `--method fp8|int8` writes, in
    compressed-tensors: llm-compressor's FP8_DYNAMIC (e4m3 weights, float-quantized) or W8A8 INT8
    (int8 weights, int-quantized) scheme, per-channel weight scales, dynamic per-token activations;
    lm_head in `ignore` unless it is quantized too."""
    kind, fmt = ("float", "float-quantized") if method == "fp8" else ("int", "int-quantized")
    weights = {"type": kind, "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}
    acts = {"type": kind, "num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "ignore": [] if lm_head else ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "quantization_status": "compressed",
        "quantizer": ["inferfleet", method],
    }


def write_checkpoint(
    model_dir: str | Path, out_dir: str | Path, tensors: dict[str, torch.Tensor], qconfig: dict[str, Any]
) -> Path:
    """Safetensors shards of <= 4 GB, every other file of model_dir copied, and config.json with
    `qconfig` as its quantization_config, written last: its presence means the checkpoint is whole."""
    from ..tiny import save_safetensors

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = {"config.json", "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    save_safetensors(tensors, out, shards=max(1, -(-nbytes // (4 * 2**30))))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _original_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor as stored (no dtype conversion), copied out of the mapping."""
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        f = SafetensorsFile(path)
        for t in f.entries:
            out[t.name] = f.view(t).clone()
    return out


def _is_quantized_weight(name: str, lm_head: bool) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj' (and
    'lm_head.weight' -> 'lm_head' when `lm_head`); None for tensors that stay as they are."""
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    if module == "lm_head":
        return module if lm_head else None
    return module if module.endswith(_QUANTIZED) and ".layers." in module else None


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    spec: QuantizeSpec,
    calibration_text: str | None = None,
    device: str = "auto",
) -> list[LayerReport]:
    """Quantize `model_dir` into `out_dir`; returns the per-layer report (also written as
    quantize_report.json in `out_dir`)."""
    spec.validate()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    mc = ModelConfig.from_pretrained(model_dir)
    if mc.quantization_config:
        raise InvalidRequestError(
            "the input checkpoint is already quantized (config.json has quantization_config)", param="model"
        )
    check_lm_head(spec, mc)
    t0 = time.perf_counter()
    reports: list[LayerReport] = []
    row_scaled = spec.method in ROW_SCALED
    # method kv: the weights as stored, with KV cache scales (llm-compressor's KV-only recipe)
    kv_only = spec.method == "kv"

    def samples(what: str) -> torch.Tensor:
        if not calibration_text:
            raise InvalidRequestError(f"{what} needs --calibration text", param="calibration")
        seqlen = min(spec.seqlen, mc.max_position_embeddings)
        return calibration_samples(calibration_text, model_dir, spec.nsamples, seqlen, spec.seed)

    # what quantize_report.json says of the spec: an fp8 / int8 checkpoint has no grid, its spec is the
    # method, the lm_head choice and the KV cache scales; method kv has only its name
    if kv_only:
        qconfig: dict[str, Any] = {"quant_method": "compressed-tensors", "quantizer": ["inferfleet", "kv"]}
        spec_report: dict[str, Any] = {"method": "kv"}
    elif row_scaled:
        qconfig = row_scaled_quantization_config(spec.method, spec.lm_head)
        spec_report = {
            "method": spec.method,
            "lm_head": spec.lm_head,
            "kv_cache_scales": spec.kv_cache_scales,
        }
    else:
        qconfig, spec_report = quantization_config(spec), asdict(spec)
    kv_scales: dict[int, tuple[float, float]] = {}
    if spec.method != "gptq":
        if row_scaled and calibration_text and not spec.kv_cache_scales:
            raise InvalidRequestError(
                f"method {spec.method} uses no calibration data (unless --kv-cache-scales)",
                param="calibration",
            )
        if spec.kv_cache_scales or kv_only:
            ids = samples("method kv" if kv_only else "--kv-cache-scales")
            kv_scales = kv_cache_scales(model_dir, ids, dev, spec.batch_size)
            qconfig["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
        tensors = _original_tensors(model_dir) if kv_only else _rtn_stream(model_dir, mc, spec, dev)
        for li, (k_scale, v_scale) in kv_scales.items():
            tensors[f"model.layers.{li}.self_attn.k_scale"] = torch.tensor([k_scale], dtype=torch.float32)
            tensors[f"model.layers.{li}.self_attn.v_scale"] = torch.tensor([v_scale], dtype=torch.float32)
    else:
        ids = samples("GPTQ")
        tensors = _original_tensors(model_dir)

        # packed on the CPU as each matrix is done, split into the checkpoint tensors stacked in it
        def write(name: str, res: QuantResult, sizes: list[int]) -> None:
            if name == "lm_head":
                parts = [("lm_head", res)]
            else:
                prefix, block, proj = name.rsplit(".", 2)  # model.layers.3, self_attn, qkv_proj
                parts = [
                    (f"{prefix}.{p}", sub) for p, sub in zip(_SPLITS[f"{block}.{proj}"], _split(res, sizes))
                ]
            for module, sub in parts:
                del tensors[f"{module}.weight"]
                for key, value in gptq_tensors(sub, spec.bits).items():
                    tensors[f"{module}.{key}"] = value

        _, reports = gptq_model(model_dir, ids, spec, dev, sink=write)
    out = write_checkpoint(model_dir, out_dir, tensors, qconfig)
    summary = {
        "spec": spec_report,
        "seconds": time.perf_counter() - t0,
        "layers": [asdict(r) for r in reports],
    }
    if kv_scales:
        summary["kv_cache_scales"] = [
            {"layer": li, "k_scale": k, "v_scale": v} for li, (k, v) in kv_scales.items()
        ]
    (out / "quantize_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return reports


def _rtn_stream(
    model_dir: str | Path, mc: ModelConfig, spec: QuantizeSpec, dev: torch.device
) -> dict[str, torch.Tensor]:
    """Round to nearest, one checkpoint tensor at a time (on `dev`): into the GPTQ layout (rtn), or
    8-bit codes and float32 per-channel scales as the fp8 / int8 methods quantize at load."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mc.torch_dtype or "", torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    # the weights it quantizes arrive as stored (not rounded to the model dtype first), as the loader
    # hands them to layers that quantize at load
    keep = lambda name: _is_quantized_weight(name, spec.lm_head) is not None  # noqa: E731
    for name, x in iter_weights(model_dir, dtype, dev, keep_dtype=keep):
        module = _is_quantized_weight(name, spec.lm_head)
        if module is None:
            tensors[name] = x.to("cpu", copy=True)  # never a view of the input's mapping
            continue
        if spec.method in ROW_SCALED:
            q, scale = ROW_SCALED[spec.method](x)
            tensors[f"{module}.weight"] = q.cpu()
            tensors[f"{module}.weight_scale"] = scale.reshape(-1, 1).cpu()
            continue
        res = rtn_quantize(x.float(), spec.bits, spec.group_size, spec.sym)
        for key, value in gptq_tensors(res, spec.bits).items():
            tensors[f"{module}.{key}"] = value
    return tensors
