"""Linear methods: how a quantized `Linear` holds, loads and multiplies its weights.

A method is stateless configuration; the tensors live on the layer as parameters (checkpoint layout,
so `DecoderModel.load_weights` can check that every one is written) and, after
`process_after_loading`, as whatever layout its kernels read. Merged layers (qkv, gate_up) load
shard by shard: `load` writes the shard's slice of every tensor the checkpoint tensor feeds and
returns their names, so the loader knows which (tensor, shard) pairs are done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import kernels
from ..errors import ModelLoadError
from .spec import QuantConfig

if TYPE_CHECKING:
    from ..layers.linear import Linear

# On CUDA, decode batches stream the weights through the Triton kernels. FP8 runs W8A8 through
# torch._scaled_mm above fp8.W8A16_MAX_M rows; the weight-only methods (INT8, GPTQ) keep the fused
# kernels, tiled over M, up to FUSED_MAX_M rows (decode batches of W1-like loads), and only
# prefill-sized batches pay for widening the whole matrix for cuBLAS.
FUSED_MAX_M = kernels.MAX_M


class LinearMethod:
    # parameters a checkpoint may leave out (the method fills a default at construction)
    optional_params: tuple[str, ...] = ()
    # checkpoint tensors `load` takes besides the parameters' own names (another layout's names)
    extra_tensors: tuple[str, ...] = ()
    # whether apply_one_row runs kernels/gemv.gemv, with the epilogues only it has (`argmax_best`,
    # Linear.float_output_argmax; `add_into` and `norm_in`, Linear.add_norm's consumer)
    one_row_gemv: bool = False

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
        """x [M, K] (Linear.forward flattens the leading dims) -> y [M, N] in x's dtype."""
        raise NotImplementedError

    def apply_one_row(self, layer: Linear, x: torch.Tensor, **epilogue: Any) -> torch.Tensor | None:
        """One row x [1, K] of CUDA activations through the method's one-row kernel with a fused
        epilogue (Linear._one_row), or None where the method has none."""
        return None

    def widens_above(self, layer: Linear) -> int | None:
        """The most rows `apply` takes on CUDA without widening the whole weight matrix to 16 bits
        for cuBLAS (None: it never does); a CUDA graph capturing a larger batch would keep the
        widened copy in its pool (cuda_graphs.MixedGraphs)."""
        return None


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


def row_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric per-row scales of w [N, K]: max|W[n, :]| / qmax in float32 (1 for an all-zero row)."""
    amax = w.abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Row-scaled codes q [N, K] -> W [N, K] float32."""
    return q.float() * scale.float().reshape(-1, 1)


class RowScaledMethod(LinearMethod):
    """8-bit weights with one float32 scale per output row (INT8, FP8). Parameters: weight [N, K]
    `weight_dtype`, weight_scale [N] float32. CUDA batches of up to `gemv_max_m()` rows (with
    16-bit activations) stream the codes through kernels/gemv.py; other batches take `fallback`."""

    weight_dtype: torch.dtype
    one_row_gemv = True

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A float weight [N, K] -> (codes [N, K] `weight_dtype`, scales [N] float32)."""
        raise NotImplementedError

    def gemv_max_m(self) -> int:
        raise NotImplementedError

    def widens_above(self, layer: Linear) -> int | None:
        return self.gemv_max_m()  # `fallback` widens (FP8's takes _scaled_mm where it can)

    def fallback(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def create_weights(self, layer: Linear) -> None:
        n, k = sum(layer.output_sizes), layer.in_features
        new_param(layer, "weight", (n, k), self.weight_dtype)
        new_param(layer, "weight_scale", (n,), torch.float32)

    def _load_float(self, layer: Linear, lo: int, hi: int, tensor: torch.Tensor) -> list[str]:
        """Quantize a float checkpoint weight (shape already checked) into rows lo:hi."""
        q, s = self.quantize(tensor)  # streamed: one checkpoint tensor at a time
        layer.weight.data[lo:hi].copy_(q)
        layer.weight_scale.data[lo:hi].copy_(s)
        return ["weight", "weight_scale"]

    def load(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str) -> list[str]:
        """Codes stored in `weight_dtype` with their weight_scale (per row [rows, 1] or one element
        per tensor), or a 16/32-bit float weight quantized here."""
        lo, hi = layer.shard_range(shard)
        kind = str(self.weight_dtype).removeprefix("torch.")
        if name == "weight":
            check_shape(ck_name, tensor, (hi - lo, layer.in_features))
            if tensor.dtype == self.weight_dtype:
                layer.weight.data[lo:hi].copy_(tensor)
                return ["weight"]
            if not tensor.is_floating_point() or tensor.element_size() == 1:
                raise ModelLoadError(f"{ck_name}: this layer takes {kind} codes or 16/32-bit float weights")
            return self._load_float(layer, lo, hi, tensor)
        if name == "weight_scale":
            dest = layer.weight_scale.data[lo:hi]
            if tensor.numel() == 1:  # per-tensor scale: the same for every row of this shard
                dest.copy_(tensor.reshape(()).float().expand(hi - lo))
            elif tensor.numel() == hi - lo:
                dest.copy_(tensor.reshape(-1))
            else:
                raise ModelLoadError(
                    f"{ck_name}: weight_scale has shape {tuple(tensor.shape)}; expected [{hi - lo}, 1] "
                    "(per channel) or one element (per tensor)"
                )
            return ["weight_scale"]
        raise ModelLoadError(f"{ck_name}: {kind} layers take weight and weight_scale tensors only")

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if kernels.triton_ok(x) and x.shape[0] <= self.gemv_max_m():
            from ..kernels.gemv import gemv

            return gemv(x, layer.weight, layer.weight_scale, layer.bias)
        return self.fallback(layer, x)

    def apply_one_row(self, layer: Linear, x: torch.Tensor, **epilogue: Any) -> torch.Tensor | None:
        if self.gemv_max_m() < 1:
            return None
        from ..kernels.gemv import gemv

        return gemv(x, layer.weight, layer.weight_scale, layer.bias, **epilogue)
