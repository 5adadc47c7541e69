"""Linear layers whose weights load from one or several checkpoint tensors (merged QKV, gate/up).

A quantized layer (FP8, INT8, GPTQ: `quant` set) hands its parameters, their loading and its matmul
to a linear method from worker/quant/ (vLLM's LinearMethod split); the plain path below is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels

if TYPE_CHECKING:
    from ..quant.methods import LinearMethod
    from ..quant.spec import QuantConfig

# decode batches up to this many rows stream the weights through kernels/gemv.py; larger batches
# (and prefill) go to cuBLAS. Measured on the H100: timed alone (the first session's tile sweep,
# since replaced by bench/gemv_bench.py), the kernel beat cuBLAS at M <= 16 on every Llama-8B
# projection and lost or tied at M = 64; chained in a graph at 8 rows (bench/gemv_bench.py --rows 8)
# the two are even (5.26 vs 5.24 ms for 32 layers), at one row it wins (4.85 vs 5.17 ms). 0 turns
# the streaming path off.
SKINNY_MAX_M = 16


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists the checkpoint tensors stacked along the output dim:
    QKV is [q, k, v], gate/up is [gate, up]; each shard loads into its own row range."""

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool = False, quant: QuantConfig | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        out = sum(output_sizes)
        self.method: LinearMethod | None = None
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        else:
            from ..quant.methods import make_linear_method

            self.method = make_linear_method(quant)
            self.method.create_weights(self)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = sum(self.output_sizes[:shard])
        return start, start + self.output_sizes[shard]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is not None:  # methods take [M, K]: leading dims flattened here, once
            y = self.method.apply(self, x.reshape(-1, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if x.dim() == 2 and x.shape[0] <= SKINNY_MAX_M and kernels.triton_ok(x):
            from ..kernels.gemv import gemv

            return gemv(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)
