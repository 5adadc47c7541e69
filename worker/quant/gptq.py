"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): packing, the dequantize reference, the linear method.

Checkpoint layout of one linear layer y = x W^T, W [N, K] (N outputs, K inputs), `bits` b, p = 32 / b
codes per int32, G = ceil(K / group_size) groups (G = 1 for group_size -1):

    qweight  int32 [K / p, N]   code of W[n, k] in bits b*(k % p) of qweight[k // p, n]   (packed along K)
    qzeros   int32 [G, N / p]   zero of (g, n) in bits b*(n % p) of qzeros[g, n // p]      (packed along N)
    scales   fp16  [G, N]
    g_idx    int32 [K]          group of input channel k: k // group_size, or with act-order (desc_act)
                                the group of k's position in the descending-diag(H) order
    W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]

Zero points: AutoGPTQ's v1 format ("checkpoint_format": "gptq", what AutoGPTQ writes and the
default) stores zero - 1; reading adds 1 back and keeps the low b bits, as AutoGPTQ's own torch
dequantization does, so a stored 15 (4-bit) reads as zero 0. GPTQModel's "gptq_v2" stores the zero
itself. Symmetric checkpoints have zero 2^(b-1) everywhere (stored 0x77777777 in v1 at 4 bits).

Merged layers (qkv, gate_up) concatenate along N: qweight and scales by columns, qzeros by packed
columns (every shard's N is a multiple of p), and g_idx is the same for every shard because they
share their input (checked on load).

After loading, the method rewrites the layer for the kernels (kernels/gptq_gemm.py): codes packed
along K per output row (qweight_t [N, K / p]), scales_t [N, G], zeros_t uint8 [N, G]; with act-order
the input channels are sorted by group once (the ExLlama trick), so groups become contiguous and a
forward permutes the activation columns instead of gathering scales per element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from .. import kernels
from ..errors import ModelLoadError, UnsupportedModelError
from .methods import FUSED_MAX_M, LinearMethod, check_shape, new_param
from .spec import QuantConfig

if TYPE_CHECKING:
    from ..layers.linear import Linear

# the tensors a GPTQ checkpoint stores per linear layer
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes along `dim` (its length a multiple of 32 / bits) into int32,
    element j of each run of 32 / bits in bits [bits * j, bits * (j + 1))."""
    p = 32 // bits
    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // p, p)
    shifts = torch.arange(p, dtype=torch.int64, device=c.device) * bits
    v = (c << shifts).sum(-1)
    v = torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)  # the same 32 bits, as a signed int
    return v.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 codes, `dim` grown 32 / bits times."""
    p = 32 // bits
    c = packed.movedim(dim, -1)
    shifts = torch.arange(p, dtype=torch.int32, device=c.device) * bits
    codes = (c.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*c.shape[:-1], c.shape[-1] * p)
    return codes.movedim(-1, dim).contiguous()


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def unpack_zeros(qzeros: torch.Tensor, bits: int, zero_offset: int) -> torch.Tensor:
    """qzeros [G, N / p] -> zero points [G, N] int32 (v1: stored + 1, low bits kept)."""
    return (unpack_int32(qzeros, bits, 1) + zero_offset) & ((1 << bits) - 1)


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """The reference: checkpoint tensors -> W [N, K] float32."""
    q = unpack_int32(qweight, bits, 0)  # [K, N]
    z = unpack_zeros(qzeros, bits, zero_offset)  # [G, N]
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).t().contiguous()


def dequantize_kernel_layout(
    qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """The processed layout -> W [N, K] float32 (columns in the layer's stored K order)."""
    q = unpack_int32(qweight_t, bits, 1)  # [N, K]
    g = g_idx.long()
    return (q - zeros_t[:, g].int()).float() * scales_t.float()[:, g]


class GptqLinearMethod(LinearMethod):
    def __init__(self, quant: QuantConfig) -> None:
        super().__init__(quant)
        self.bits = quant.bits
        self.pack = 32 // quant.bits
        # a checkpoint without act-order may omit g_idx: it is k // group_size; compressed-tensors'
        # symmetric layout stores no zeros (every zero is 2^(b-1))
        self.optional_params = () if quant.desc_act else ("g_idx",)
        if quant.layout == "compressed-tensors":
            self.optional_params += ("qzeros",)
            self.extra_tensors = ("weight_packed", "weight_scale", "weight_g_idx", "weight_shape")

    def create_weights(self, layer: Linear) -> None:
        k, n, p = layer.in_features, sum(layer.output_sizes), self.pack
        if k % p or any(s % p for s in layer.output_sizes):
            raise UnsupportedModelError(
                f"GPTQ {self.bits}-bit needs every linear layer's input and output sizes to be multiples "
                f"of {p}; got in {k}, out {layer.output_sizes}"
            )
        g = num_groups(k, self.quant.group_size)
        new_param(layer, "qweight", (k // p, n), torch.int32)
        new_param(layer, "qzeros", (g, n // p), torch.int32)
        new_param(layer, "scales", (g, n), torch.float16)
        new_param(layer, "g_idx", (k,), torch.int32)
        gs = self.quant.group_size if self.quant.group_size != -1 else k
        layer.g_idx.data.copy_(torch.arange(k, dtype=torch.int32) // gs)
        layer.gptq_g_idx_shards = set()  # shards whose g_idx has been loaded (they must agree)
        if self.quant.layout == "compressed-tensors":  # symmetric: zero 2^(b-1) everywhere (v2)
            mid = torch.full((g, n), 1 << (self.bits - 1), dtype=torch.int32)
            layer.qzeros.data.copy_(pack_int32(mid, self.bits, 1))

    def load(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str) -> list[str]:
        if self.quant.layout == "compressed-tensors":
            return self._load_compressed_tensors(layer, name, shard, tensor, ck_name)
        return self._load_gptq(layer, name, shard, tensor, ck_name)

    def _load_gptq(
        self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str
    ) -> list[str]:
        k, p = layer.in_features, self.pack
        g = num_groups(k, self.quant.group_size)
        lo, hi = layer.shard_range(shard)
        if name == "qweight":
            check_shape(ck_name, tensor, (k // p, hi - lo))
            layer.qweight.data[:, lo:hi].copy_(tensor)
        elif name == "qzeros":
            check_shape(ck_name, tensor, (g, (hi - lo) // p))
            layer.qzeros.data[:, lo // p : hi // p].copy_(tensor)
        elif name == "scales":
            check_shape(ck_name, tensor, (g, hi - lo))
            layer.scales.data[:, lo:hi].copy_(tensor)
        elif name == "g_idx":
            check_shape(ck_name, tensor, (k,))
            seen: set[int] = layer.gptq_g_idx_shards
            if seen and not torch.equal(layer.g_idx.data, tensor.to(layer.g_idx.device, torch.int32)):
                raise ModelLoadError(f"{ck_name}: g_idx differs between the shards of one merged layer")
            layer.g_idx.data.copy_(tensor)
            seen.add(shard)
        else:
            raise ModelLoadError(f"{ck_name}: GPTQ layers take {', '.join(TENSORS)} (and bias) only")
        return [name]

    def _load_compressed_tensors(
        self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ck_name: str
    ) -> list[str]:
        """compressed-tensors pack-quantized tensors of one shard into the GPTQ parameters:
        weight_packed [n, K / p] (codes + 2^(b-1) packed along K, element j of a word in bits b*j)
        -> qweight columns; weight_scale [n, G] -> scales columns; weight_g_idx [K] -> g_idx;
        weight_shape [2] checked."""
        k, p = layer.in_features, self.pack
        g = num_groups(k, self.quant.group_size)
        lo, hi = layer.shard_range(shard)
        if name == "weight_packed":
            # the same words as GPTQ's qweight, transposed: word (n, k // p) holds codes k.. of row n
            check_shape(ck_name, tensor, (hi - lo, k // p))
            layer.qweight.data[:, lo:hi].copy_(tensor.t())
            return ["qweight"]
        if name == "weight_scale":
            check_shape(ck_name, tensor, (hi - lo, g))
            layer.scales.data[:, lo:hi].copy_(tensor.t())
            return ["scales"]
        if name == "weight_g_idx":
            return self._load_gptq(layer, "g_idx", shard, tensor, ck_name)
        if name == "weight_shape":
            if [int(v) for v in tensor.reshape(-1)] != [hi - lo, k]:
                raise ModelLoadError(f"{ck_name}: weight_shape {tensor.tolist()} is not [{hi - lo}, {k}]")
            return []
        raise ModelLoadError(
            f"{ck_name}: pack-quantized layers take weight_packed, weight_scale, weight_g_idx and "
            "weight_shape (and bias) only"
        )

    def process_after_loading(self, layer: Linear) -> None:
        bits, k = self.bits, layer.in_features
        g_idx = layer.g_idx.data.long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= layer.scales.shape[0]:
            raise ModelLoadError(f"g_idx holds groups outside [0, {layer.scales.shape[0]})")
        codes = unpack_int32(layer.qweight.data, bits, 0).to(torch.uint8)  # [K, N]
        perm: torch.Tensor | None = None
        if bool((g_idx[1:] < g_idx[:-1]).any()):  # act-order: sort the input channels by group
            perm = torch.argsort(g_idx, stable=True)
            codes = codes.index_select(0, perm)
            g_idx = g_idx[perm]
        groups = layer.scales.shape[0]
        gs = self.quant.group_size if self.quant.group_size != -1 else k
        contiguous = groups == 1 or torch.equal(g_idx, torch.arange(k, device=g_idx.device) // gs)
        zeros = unpack_zeros(layer.qzeros.data, bits, self.quant.zero_offset)  # [G, N]
        qweight_t = pack_int32(codes.t(), bits, 1)  # [N, K / p]
        scales_t = layer.scales.data.t().contiguous()
        for name in TENSORS:
            delattr(layer, name)
        del layer.gptq_g_idx_shards
        layer.register_buffer("qweight_t", qweight_t, persistent=False)
        layer.register_buffer("scales_t", scales_t, persistent=False)
        layer.register_buffer("zeros_t", zeros.t().to(torch.uint8).contiguous(), persistent=False)
        layer.register_buffer("g_idx_k", g_idx.to(torch.int32), persistent=False)
        layer.register_buffer("perm", perm, persistent=False)
        # contiguous groups of `group_k` channels let the kernel load one scale row per K block
        layer.group_k = (k if groups == 1 else gs) if contiguous else 0
        # the kernel of one-row CUDA batches depends on this layout only, decided once: the Gluon
        # kernel (4-bit, groups of whole words), else the Triton one, else none (gptq_gemm)
        layer.gptq_one_row = None
        if kernels.AVAILABLE:
            from ..kernels.gptq_gemm import row4_ok, stream_ok

            if stream_ok(layer.group_k, bits, k):
                layer.gptq_one_row = "row4" if row4_ok(bits, layer.group_k) else "stream"

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The processed layer's W [N, K] in float32, in the layer's (possibly permuted) K order."""
        return dequantize_kernel_layout(
            layer.qweight_t, layer.scales_t, layer.zeros_t, layer.g_idx_k, self.bits
        )

    def _torch_apply(
        self, layer: Linear, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] (the layer's input order) -> x . W^T + bias, x and the dequantized W in `dtype`."""
        if layer.perm is not None:
            x = x.index_select(1, layer.perm)
        return F.linear(x.to(dtype), self.dequantize(layer).to(dtype), bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not kernels.triton_ok(x):
            return self._torch_apply(layer, x, x.dtype, layer.bias)
        from ..kernels.gptq_gemm import gptq_dequant, gptq_gemm, gptq_stream

        m = x.shape[0]
        if m == 1 and (y := self.apply_one_row(layer, x)) is not None:
            return y
        if layer.perm is not None:
            x = x.index_select(1, layer.perm)
        if m == 1 and layer.gptq_one_row == "stream":
            return gptq_stream(
                x, layer.qweight_t, layer.scales_t, layer.zeros_t, self.bits, layer.group_k, layer.bias
            )
        packed = (layer.qweight_t, layer.scales_t, layer.zeros_t, layer.g_idx_k, self.bits, layer.group_k)
        if m <= FUSED_MAX_M:
            return gptq_gemm(x, *packed, bias=layer.bias)
        return F.linear(x, gptq_dequant(*packed, dtype=x.dtype), layer.bias)

    def widens_above(self, layer: Linear) -> int | None:
        return FUSED_MAX_M  # above it, apply dequantizes the whole matrix for cuBLAS

    def apply_one_row(self, layer: Linear, x: torch.Tensor, **epilogue: Any) -> torch.Tensor | None:
        """The one-row Gluon kernel with a fused epilogue, where this layer runs on it."""
        if layer.gptq_one_row != "row4":
            return None
        from ..kernels.gptq_row4 import gptq_row4

        if layer.perm is not None:
            x = x.index_select(1, layer.perm)
        return gptq_row4(
            x, layer.qweight_t, layer.scales_t, layer.zeros_t, layer.group_k, layer.bias,
            input_bound=layer.input_bound, **epilogue,
        )  # fmt: skip

    def kernel_reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """What kernels/gptq_gemm.py's per-block-scale path computes for x [M, K]: x . W + b in
        float32 with the exact W, rounded once to x's dtype (the torch path rounds W first)."""
        bias = layer.bias.float() if layer.bias is not None else None
        return self._torch_apply(layer, x, torch.float32, bias).to(x.dtype)
