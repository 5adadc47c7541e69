"""Which weight precision a worker runs: `--quantization` against the checkpoint's quantization_config.

Torch-free on purpose: `config.EngineConfig` calls `resolve_quantization` while validating, and the
answer (a `QuantConfig`, or None for plain weights) travels to the model inside `ModelConfig.quant`.

| requested | plain checkpoint         | GPTQ checkpoint | FP8 (compressed-tensors, AutoFP8) | INT8 (compressed-tensors) |
|-----------|--------------------------|-----------------|-----------------------------------|---------------------------|
| none      | none                     | gptq (detected) | fp8 (detected)                    | int8 (detected)           |
| fp8       | fp8, quantized at load   | refused         | fp8                               | refused                   |
| int8      | int8, quantized at load  | refused         | refused                           | int8                      |
| gptq      | refused (run `quantize`) | gptq            | refused                           | refused                   |

GPTQ checkpoints are AutoGPTQ's / GPTQModel's, or compressed-tensors' pack-quantized (W4A16,
W8A16). FP8 also needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper) and a 16-bit model
dtype. lm_head stays in the model dtype unless the checkpoint stores it quantized, or `quantize_lm_head`
asks fp8 / int8 at load to quantize it too (untied models only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidRequestError, UnsupportedModelError

METHODS = ("none", "fp8", "int8", "gptq")
FP8_MIN_CAPABILITY = (8, 9)
GPTQ_BITS = (2, 4, 8)  # the ones that pack evenly into int32 (3-bit needs a different layout)


@dataclass(frozen=True)
class QuantConfig:
    """How the decoder's projections (qkv, o, gate_up, down) store their weights. The embedding stays
    in the model dtype; so does lm_head, as AutoGPTQ and llm-compressor leave it, unless the
    checkpoint quantized it too (`lm_head` here: GPTQModel's `lm_head: true`, or a compressed-tensors
    FP8 config that targets lm_head and does not `ignore` it)."""

    method: str  # "fp8" | "int8" | "gptq"
    from_checkpoint: bool  # True: the tensors are stored quantized; False: quantize at load
    bits: int = 8
    group_size: int = -1  # GPTQ: input channels per scale/zero group; -1 = one group per row
    desc_act: bool = False  # GPTQ act-order: g_idx is a permutation of groups, not k // group_size
    sym: bool = True
    zero_offset: int = 0  # GPTQ v1 (AutoGPTQ) stores zero - 1, so 1 is added back on load
    # gptq: the tensors' layout, "gptq" (qweight / qzeros / scales / g_idx) or "compressed-tensors"
    # (pack-quantized: weight_packed / weight_scale / weight_g_idx, read into the same layers)
    layout: str = "gptq"
    lm_head: bool = False  # lm_head is stored quantized as well (GPTQ: same bits and groups; FP8)
    # compressed-tensors / AutoFP8: the modules the config targets and ignores (stores_quantized);
    # None for the other layouts, which quantize every decoder projection
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    # compressed-tensors with static per-tensor activation scales: the stored `input_scale` tensors
    # are read and not applied; activations get dynamic per-token scales like FP8_DYNAMIC's
    static_input_scales: bool = False
    # an FP8 KV cache scheme (compressed-tensors `kv_cache_scheme`: per-tensor `k_scale` / `v_scale`;
    # AutoFP8's: `k_proj.output_scale` / `v_proj.output_scale`): each attention layer takes its
    # scales, which an fp8 KV cache (--kv-cache-dtype fp8) applies; a 16-bit cache does not need them
    kv_scales: bool = False

    def stores_quantized(self, module: str) -> bool:
        """Whether the checkpoint stores decoder projection `module` (its name in the checkpoint,
        e.g. model.layers.0.mlp.down_proj) quantized: always, except in compressed-tensors and
        AutoFP8 checkpoints, where the config decides as compressed-tensors matches modules
        (_matches); llm-compressor keeps the modules a recipe ignores in the model dtype."""
        if self.targets is None:
            return True
        return _selected(self.targets, self.ignore, module)

    def describe(self) -> str:
        if self.method == "gptq":
            return (
                f"gptq {self.bits}-bit, group {self.group_size}, act-order {'on' if self.desc_act else 'off'}, "
                f"{'sym' if self.sym else 'asym'}, "
                + (
                    "compressed-tensors pack-quantized"
                    if self.layout != "gptq"
                    else f"format v{2 - self.zero_offset}"
                )
                + (", lm_head quantized" if self.lm_head else "")
            )
        src = "checkpoint" if self.from_checkpoint else "quantized at load"
        kept = "activations not quantized" if self.method == "int8" else "per-token scales"
        static = f", static input scales not applied ({kept})" if self.static_input_scales else ""
        kv = ", KV cache scales (applied with kv_cache_dtype fp8)" if self.kv_scales else ""
        return f"{self.method} ({src}{', lm_head quantized' if self.lm_head else ''}{static}{kv})"


def _a(method: str) -> str:
    """The article before a method's name as it is read aloud (an fp8, an int8, a gptq)."""
    return "an" if method[:1] in "aefhilmnorsx" else "a"


def _bad(msg: str) -> InvalidRequestError:
    return InvalidRequestError(msg, param="quantization")


def checkpoint_quantization(qc: dict[str, Any] | None) -> QuantConfig | None:
    """The QuantConfig a checkpoint's config.json `quantization_config` describes (None: plain weights).
    Layouts this engine cannot read raise UnsupportedModelError naming what differs."""
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq_config(qc)
    if method == "compressed-tensors":
        if not qc.get("config_groups") and qc.get("kv_cache_scheme"):
            _kv_cache_scheme(qc)  # checked; the weights are plain: checkpoint_kv_scales says the rest
            return None
        return _compressed_tensors_config(qc)
    if method == "fp8":
        return _autofp8_config(qc)
    raise UnsupportedModelError(
        f"quantization_config.quant_method {method!r} is not supported; this worker reads GPTQ "
        "(AutoGPTQ/GPTQModel), compressed-tensors (FP8, INT8, pack-quantized W4A16/W8A16) and AutoFP8 "
        "checkpoints"
    )


def checkpoint_kv_scales(qc: dict[str, Any] | None) -> bool:
    """Whether a checkpoint stores per-layer FP8 KV cache scales (a compressed-tensors
    `kv_cache_scheme`, also without quantized weights, as llm-compressor writes a KV-cache-only
    recipe; AutoFP8's `kv_cache_scheme: static`), which the loader sets on the attention layers and
    an fp8 KV cache applies. Schemes this engine cannot apply raise UnsupportedModelError."""
    if not qc or not qc.get("kv_cache_scheme"):
        return False
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _kv_cache_scheme(qc)
    if method == "fp8":
        return _autofp8_config(qc).kv_scales
    return False


def _autofp8_config(qc: dict[str, Any]) -> QuantConfig:
    """AutoFP8's layout (`quant_method: fp8`): every Linear but `ignored_layers` stores e4m3 codes,
    one float32 weight_scale per tensor and, with activation_scheme static, one input_scale; lm_head
    is left unquantized unless `ignored_layers` is given and leaves it out. transformers' block-wise
    FP8 shares the method name (weight_block_size, weight_scale_inv) and is refused."""
    if qc.get("weight_block_size"):
        raise UnsupportedModelError(
            "FP8 with block-wise weight scales (weight_block_size, weight_scale_inv) is not supported; "
            "per-tensor (AutoFP8) and per-channel (compressed-tensors) FP8 checkpoints are"
        )
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("static", "dynamic"):
        raise UnsupportedModelError(f"FP8 activation_scheme must be static or dynamic, got {scheme!r}")
    listed = qc.get("ignored_layers")
    ignore = tuple(listed) if listed is not None else ("lm_head",)
    kv = qc.get("kv_cache_scheme")
    if kv not in (None, "static"):
        raise UnsupportedModelError(f"AutoFP8 kv_cache_scheme must be static (per-tensor scales), got {kv!r}")
    return QuantConfig(
        method="fp8",
        from_checkpoint=True,
        lm_head=_selected(("Linear",), ignore, "lm_head"),
        targets=("Linear",),
        ignore=ignore,
        static_input_scales=scheme == "static",
        kv_scales=kv is not None,
    )


def _gptq_config(qc: dict[str, Any]) -> QuantConfig:
    bits = int(qc.get("bits", 4))
    if bits not in GPTQ_BITS:
        raise UnsupportedModelError(f"GPTQ bits={bits} is not supported (supported: {GPTQ_BITS})")
    group = int(qc.get("group_size", 128))
    if group != -1 and group < 1:
        raise UnsupportedModelError(f"GPTQ group_size must be -1 or positive, got {group}")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(
            f"GPTQ checkpoint_format {fmt!r} is not supported (only the AutoGPTQ layouts gptq, gptq_v2)"
        )
    if qc.get("dynamic"):
        raise UnsupportedModelError("GPTQ per-module `dynamic` overrides are not supported")
    return QuantConfig(
        method="gptq",
        from_checkpoint=True,
        bits=bits,
        group_size=group,
        desc_act=bool(qc.get("desc_act", False)),
        sym=bool(qc.get("sym", True)),
        zero_offset=1 if fmt == "gptq" else 0,
        lm_head=bool(qc.get("lm_head", False)),
    )


def _compressed_tensors_config(qc: dict[str, Any]) -> QuantConfig:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedModelError("compressed-tensors quantization_config has no config_groups")
    fmt = str(qc.get("format", "")).lower()
    if fmt == "pack-quantized":
        return _pack_quantized_config(qc, groups)
    kinds = set()
    for name, g in groups.items():
        w = g.get("weights") or {}
        a = g.get("input_activations")
        if w.get("type") not in ("float", "int") or int(w.get("num_bits", 0)) != 8:
            raise UnsupportedModelError(
                f"compressed-tensors group {name!r}: outside format pack-quantized only 8-bit weights are read "
                "(float: FP8, int: "
                f"INT8), got type={w.get('type')!r} num_bits={w.get('num_bits')!r}"
            )
        kind = "FP8" if w["type"] == "float" else "INT8"
        kinds.add(w["type"])
        if w.get("strategy") not in ("channel", "tensor") or w.get("symmetric", True) is not True:
            raise UnsupportedModelError(
                f"compressed-tensors group {name!r}: {kind} weights must be symmetric, per channel or per "
                f"tensor, got strategy={w.get('strategy')!r} symmetric={w.get('symmetric')!r}"
            )
        if a is not None and not (a.get("type", "float") == w["type"] and int(a.get("num_bits", 8)) == 8):
            raise UnsupportedModelError(
                f"compressed-tensors group {name!r}: activations must be {kind} like the weights (type "
                f"{w['type']}, 8 bits), got type={a.get('type')!r} num_bits={a.get('num_bits')!r}"
            )
        if a is not None and not a.get("dynamic") and a.get("strategy", "tensor") != "tensor":
            raise UnsupportedModelError(
                f"compressed-tensors group {name!r}: static activation scales must be per tensor, got "
                f"strategy={a.get('strategy')!r}"
            )
    if len(kinds) > 1:
        raise UnsupportedModelError("compressed-tensors config groups mix FP8 and INT8 weights")
    if kinds == {"int"} and fmt not in ("int-quantized", "naive-quantized"):
        raise UnsupportedModelError(
            f"compressed-tensors INT8 weights must be stored as int8 tensors (format int-quantized), got "
            f"format {fmt!r} (pack-quantized INT8 is read only weight-only, as W8A16)"
        )
    targets, ignore = _targets_and_ignore(qc, groups)
    static = any(
        g.get("input_activations") and not g["input_activations"].get("dynamic") for g in groups.values()
    )
    return QuantConfig(
        method="int8" if kinds == {"int"} else "fp8",
        from_checkpoint=True,
        lm_head=_selected(targets, ignore, "lm_head"),
        targets=targets,
        ignore=ignore,
        static_input_scales=static,
        kv_scales=_kv_cache_scheme(qc),
    )


def _pack_quantized_config(qc: dict[str, Any], groups: dict[str, Any]) -> QuantConfig:
    """compressed-tensors' weight-only integer layout (llm-compressor's W4A16 / W8A16): codes packed
    along K into int32 words (`weight_packed`), per-group or per-channel `weight_scale`, symmetric,
    group indices (`weight_g_idx`) with act-order "group". The GPTQ layers read it (QuantConfig.layout)."""
    if len(groups) != 1:
        raise UnsupportedModelError("compressed-tensors pack-quantized: one config group is supported")
    name, g = next(iter(groups.items()))
    w = g.get("weights") or {}
    bits, strategy = int(w.get("num_bits", 0)), w.get("strategy")
    if w.get("type") != "int" or bits not in GPTQ_BITS:
        raise UnsupportedModelError(
            f"compressed-tensors group {name!r}: pack-quantized weights must be int of {GPTQ_BITS} bits, got "
            f"type={w.get('type')!r} num_bits={w.get('num_bits')!r}"
        )
    if w.get("symmetric", True) is not True or strategy not in ("group", "channel"):
        raise UnsupportedModelError(
            f"compressed-tensors group {name!r}: pack-quantized weights must be symmetric, per group or per "
            f"channel, got symmetric={w.get('symmetric')!r} strategy={strategy!r}"
        )
    if g.get("input_activations") is not None:
        raise UnsupportedModelError(
            f"compressed-tensors group {name!r}: pack-quantized checkpoints with quantized activations are "
            "not supported (weight-only W4A16 / W8A16 are)"
        )
    # compressed-tensors' ActivationOrdering: "dynamic" (and true) alias "group", "static" aliases
    # "weight" (llm-compressor's GPTQ default)
    aliases = {True: "group", "dynamic": "group", "static": "weight", False: None}
    actorder = aliases.get(w.get("actorder"), w.get("actorder"))
    if actorder not in (None, "group", "weight"):
        raise UnsupportedModelError(
            f"compressed-tensors group {name!r}: actorder {actorder!r} is not supported"
        )
    group_size = int(w.get("group_size") or -1) if strategy == "group" else -1
    if strategy == "group" and group_size < 1:
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: strategy group needs a group_size")
    targets, ignore = _targets_and_ignore(qc, groups)
    return QuantConfig(
        method="gptq",
        from_checkpoint=True,
        bits=bits,
        group_size=group_size,
        desc_act=actorder == "group",  # "weight": reordered while quantizing, stored in order
        sym=True,
        zero_offset=0,
        lm_head=_selected(targets, ignore, "lm_head"),
        targets=targets,
        ignore=ignore,
        kv_scales=_kv_cache_scheme(qc),
        layout="compressed-tensors",
    )


def _kv_cache_scheme(qc: dict[str, Any]) -> bool:
    """Whether a compressed-tensors config quantizes the KV cache (FP8 only; per-tensor k_scale and
    v_scale per attention layer, which the loader sets on the layers: layers/attention.kv_scales)."""
    kv = qc.get("kv_cache_scheme")
    if kv and not (
        kv.get("type", "float") == "float"
        and int(kv.get("num_bits", 8)) == 8
        and kv.get("strategy", "tensor") == "tensor"
    ):
        raise UnsupportedModelError(
            f"compressed-tensors kv_cache_scheme must be FP8 per tensor (type float, 8 bits, strategy "
            f"tensor), got type={kv.get('type')!r} num_bits={kv.get('num_bits')!r} "
            f"strategy={kv.get('strategy')!r}"
        )
    return bool(kv)


def _targets_and_ignore(
    qc: dict[str, Any], groups: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A compressed-tensors config's targets (every config group's) and its ignore list."""
    return tuple(t for g in groups.values() for t in g.get("targets", [])), tuple(qc.get("ignore") or [])


def _selected(targets: tuple[str, ...], ignore: tuple[str, ...], module: str) -> bool:
    """Whether a config quantizes `module`: some target names it and no ignore entry does."""
    return _matches(targets, module) and not _matches(ignore, module)


def _matches(entries: tuple[str, ...], module: str) -> bool:
    """Whether a compressed-tensors target or ignore list names a module (a Linear layer) as
    compressed-tensors matches them: its full name, the class "Linear", or a "re:" pattern, which
    like its `re.match` needs to match only the start of the name. A config group without `targets`
    targets nothing. llm-compressor's recipes ignore lm_head by default; the loader checks that a
    stored lm_head agrees with the config (DecoderModel.load_weights)."""
    return any(e in (module, "Linear") or (e.startswith("re:") and re.match(e[3:], module)) for e in entries)


def resolve_quantization(
    requested: str,
    checkpoint_qc: dict[str, Any] | None,
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: str,
    quantize_lm_head: bool = False,
    tied_embeddings: bool = False,
) -> QuantConfig | None:
    """The method the worker will run, or a clear refusal (InvalidRequestError, param `quantization`,
    or `quantize_lm_head`).

    `capability` is the CUDA compute capability (None on CPU); `dtype` the resolved model dtype.
    `quantize_lm_head` quantizes lm_head at load too (fp8 or int8 of a plain checkpoint, with an
    lm_head of its own: `tied_embeddings` false); a quantized checkpoint's config decides for itself.
    """
    if requested not in METHODS:
        raise _bad(f"quantization must be one of {METHODS}, got {requested!r}")
    ck = checkpoint_quantization(checkpoint_qc)
    if requested == "none":
        chosen = ck
    elif requested == "gptq":
        if ck is None or ck.method != "gptq":
            what = "plain (unquantized)" if ck is None else ck.method
            raise _bad(
                f"quantization gptq needs a GPTQ checkpoint (config.json quantization_config.quant_method "
                f"'gptq'), but this checkpoint is {what}; write one with `inferfleet-worker quantize "
                "--method gptq`, or pick quantization fp8/int8 to quantize a plain checkpoint at load"
            )
        chosen = ck
    elif requested == "fp8":
        if ck is not None and ck.method != "fp8":
            raise _bad(
                f"quantization fp8 cannot re-quantize {_a(ck.method)} {ck.method} checkpoint; use quantization none"
            )
        chosen = ck or QuantConfig(method="fp8", from_checkpoint=False)
    else:  # int8
        if ck is not None and ck.method != "int8":
            raise _bad(
                f"quantization int8 cannot re-quantize {_a(ck.method)} {ck.method} checkpoint; use quantization none"
            )
        chosen = ck or QuantConfig(method="int8", from_checkpoint=False)

    if chosen is not None and chosen.method == "fp8":
        origin = "the checkpoint is FP8" if chosen.from_checkpoint else "fp8 was asked for"
        if device_type == "cpu" or capability is None:
            raise _bad(
                f"{origin}, but FP8 runs only on NVIDIA GPUs of compute capability >= 8.9 (Ada, Hopper); "
                f"on this cpu worker quantization must be one of ('none', 'int8', 'gptq') with a checkpoint "
                "that is not FP8"
            )
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise _bad(
                f"{origin}, but FP8 needs compute capability >= 8.9 (Ada, Hopper); this GPU has "
                f"{capability[0]}.{capability[1]}: quantization must be one of ('none', 'int8', 'gptq')"
            )
        if dtype not in ("bfloat16", "float16"):
            raise _bad(f"quantization fp8 needs dtype bfloat16 or float16, got {dtype}")
    if quantize_lm_head:
        if chosen is None or chosen.from_checkpoint:
            what = (
                "quantization is none"
                if chosen is None
                else f"this {chosen.method} checkpoint's quantization_config decides whether lm_head "
                "is quantized"
            )
            raise InvalidRequestError(
                f"quantize_lm_head quantizes lm_head at load, with quantization fp8 or int8 of a plain "
                f"checkpoint; here {what}",
                param="quantize_lm_head",
            )
        if tied_embeddings:
            raise InvalidRequestError(
                "quantize_lm_head needs a model with an lm_head of its own; this one ties it to the "
                "embedding (tie_word_embeddings), which stays in the model dtype",
                param="quantize_lm_head",
            )
        chosen = replace(chosen, lm_head=True)
    return chosen
