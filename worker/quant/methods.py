"""Linear methods: how a quantized `Linear` holds, loads and multiplies its weights.

A method is stateless configuration; the tensors live on the layer as parameters (checkpoint layout,
so `DecoderModel.load_weights` can check that every one is written) and, after
`process_after_loading`, as whatever layout its kernels read. Merged layers (qkv, gate_up) load
shard by shard: `load` writes the shard's slice of every tensor the checkpoint tensor feeds and
returns their names, so the loader knows which (tensor, shard) pairs are done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ModelLoadError
from .spec import QuantConfig

if TYPE_CHECKING:
    from ..layers.linear import Linear

# On CUDA, batches up to SMALL_M rows (decode) stream the weights through the Triton kernels.
# FP8 runs W8A8 through torch._scaled_mm above that; the weight-only methods (INT8, GPTQ) keep the
# fused kernels, tiled over M, up to FUSED_MAX_M rows (decode batches of W1-like loads), and only
# prefill-sized batches pay for widening the whole matrix for cuBLAS.
SMALL_M = 64
FUSED_MAX_M = 256


class LinearMethod:
    # parameters a checkpoint may leave out (the method fills a default at construction)
    optional_params: tuple[str, ...] = ()

    def __init__(self, quant: QuantConfig) -> None:
        self.quant = quant

    def create_weights(self, layer: Linear) -> None:
        raise NotImplementedError

    def load(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str) -> list[str]:
        """Write checkpoint tensor `ck_name` (shard `shard` of the layer); return the names written."""
        raise NotImplementedError

    def process_after_loading(self, layer: Linear) -> None:
        """Turn the checkpoint layout into the kernels' layout (once, after every shard is loaded)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def make_linear_method(quant: QuantConfig) -> LinearMethod:
    if quant.method == "fp8":
        from .fp8 import Fp8LinearMethod

        return Fp8LinearMethod(quant)
    if quant.method == "int8":
        from .int8 import Int8LinearMethod

        return Int8LinearMethod(quant)
    if quant.method == "gptq":
        from .gptq import GptqLinearMethod

        return GptqLinearMethod(quant)
    raise ValueError(f"unknown quantization method {quant.method!r}")


def new_param(layer: Linear, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Register an empty frozen parameter (on the default device the model is being built on)."""
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))


def check_shape(ck_name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ModelLoadError(
            f"{ck_name}: checkpoint shape {tuple(tensor.shape)} does not match {tuple(expected)} "
            "implied by config.json and quantization_config"
        )
