"""Linear layers whose weights load from one or several checkpoint tensors (merged QKV, gate/up).

A quantized layer (FP8, INT8, GPTQ: `quant` set) hands its parameters, their loading and its matmul
to a linear method from worker/quant/ (vLLM's LinearMethod split); the plain path below is unchanged.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..kernels import blaslt
from .norm import PendingNorm, RMSNorm

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
# one-row projections that feed the residual stream (o_proj, down_proj) add into it and apply the
# next RMSNorm in their own launch (Linear.add_norm); INFERFLEET_FUSED_NORM=0 (or False here, before
# the decode graphs are captured) keeps the separate norm kernel, for A/B measurements
FUSED_NORM = os.environ.get("INFERFLEET_FUSED_NORM", "1") != "0"
# where the next layer's one-row launch can normalize its input itself (kernels/gemv.NormIn), the
# projection only adds into the stream and hands on a PendingNorm (Linear.add_norm's `consumer`):
# no ticket and no last program normalizing while the other SMs wait. INFERFLEET_DEFER_NORM=0
# keeps AddNorm's fused norm everywhere, for A/B measurements
DEFER_NORM = os.environ.get("INFERFLEET_DEFER_NORM", "1") != "0"
# where the consumer's weights are 8-bit (Linear.takes_rms_in), the norm is split instead: the
# projection adds into the stream and hands on the stream times the norm's weight with partial sums
# of squares, and the consumer scales its results by 1 / rms (kernels/gemv.AddSquares, RmsIn): no
# ticket, and no per-element norm in the 8-bit weight loop. INFERFLEET_RMS_SQUARES=0 keeps AddNorm
# there, for A/B measurements
RMS_SQUARES = os.environ.get("INFERFLEET_RMS_SQUARES", "1") != "0"
# likewise, one-row gate/up projections return silu(gate) * up from their own launch
# (Linear.silu_mul); INFERFLEET_FUSED_SILU=0 keeps the separate kernel
FUSED_SILU = os.environ.get("INFERFLEET_FUSED_SILU", "1") != "0"
# weight tiles a one-row 16-bit projection that follows attention (o_proj: `follows_attention`)
# loads before its PDL wait, while attention leaves DRAM nearly idle (kernels/gemv.gemv's
# `prefetch`; the default elsewhere is 2). H100 W3 bf16 5.385-5.389 -> 5.345 ms with 4 (3: 5.364);
# 8-bit o_proj stays at 2: 4 made fp8 slower, 3.194 -> 3.239 (docs/benchmarks.md, eleventh session).
# INFERFLEET_O_PREFETCH overrides it, for A/B measurements.
AFTER_ATTENTION_PREFETCH = int(os.environ.get("INFERFLEET_O_PREFETCH", "4"))


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists the checkpoint tensors stacked along the output dim:
    QKV is [q, k, v], gate/up is [gate, up]; each shard loads into its own row range."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        quant: QuantConfig | None = None,
        follows_attention: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.follows_attention = follows_attention  # its input is attention's output (o_proj)
        # the largest |x| the layer's input can hold, where the model knows one (an RMSNorm's output:
        # sqrt(K) * max |weight|); None: unbounded. kernels/gptq_row4 skips its overflow check below it
        self.input_bound: float | None = None
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

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        if isinstance(x, PendingNorm):
            y = self._one_row(x)
            if y is not None:
                return y
            x = x.value()
        if self.method is not None:  # methods take [M, K]: leading dims flattened here, once
            y = self.method.apply(self, x.reshape(-1, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if x.dim() == 2 and x.shape[0] <= SKINNY_MAX_M and kernels.triton_ok(x):
            from ..kernels.gemv import gemv

            return gemv(x, self.weight, bias=self.bias)
        if x.is_cuda and self.bias is None:  # a row count blaslt.tune picked another algorithm for
            lt = blaslt.get(x.device)
            y = lt.linear(x, self.weight) if lt is not None else None
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def _one_row_input(x: torch.Tensor) -> bool:
        """One row of 16-bit CUDA activations, where the one-row kernels (Triton) can run."""
        return x.dim() == 2 and x.shape[0] == 1 and kernels.triton_ok(x)

    def _one_row(self, x: torch.Tensor | PendingNorm, **epilogue: Any) -> torch.Tensor | None:
        """One row x [1, K] of CUDA activations through the layer's one-row kernel with a fused
        epilogue (kernels/gemv.gemv's or gptq_row4's `add_norm`, `silu_mul`, `out_dtype`); None where
        the layer does not run on one (the caller then runs the plain layer and the rest unfused).
        A PendingNorm goes in as gemv's `rms_in` where it holds partial squares and the layer takes
        them (takes_rms_in), else as `norm_in` where the layer takes one (takes_norm_in)."""
        if isinstance(x, PendingNorm):
            split = x.scaled is not None and x.squares is not None
            if split and self.takes_rms_in() and self._one_row_input(x.scaled):
                from ..kernels.gemv import RmsIn

                return self._one_row_kernel(x.scaled, rms_in=RmsIn(x.squares, x.norm.eps), **epilogue)
            if not (self.takes_norm_in() and self._one_row_input(x.residual)):
                return None
            from ..kernels.gemv import NormIn

            return self._one_row_kernel(x.residual, norm_in=NormIn(x.norm.weight, x.norm.eps), **epilogue)
        return self._one_row_kernel(x, **epilogue) if self._one_row_input(x) else None

    def runs_gemv(self) -> bool:
        """Whether the layer's one-row kernel is kernels/gemv.gemv, with the epilogues only it has
        (`argmax_best`, `add_into`)."""
        if self.method is not None:
            return self.method.one_row_gemv
        return SKINNY_MAX_M >= 1

    def takes_norm_in(self) -> bool:
        """Whether a one-row input may come as a PendingNorm, which the launch normalizes as it reads
        it (gemv's `norm_in`): 16-bit weights only. In an 8-bit layer the per-element norm costs more
        than the ticket it saves: H100 FP8 W3 3.001 -> 3.038 ms with qkv normalizing its input, 3.003
        with gate/up (bf16 5.339 -> 5.306 with both; docs/benchmarks.md, twelfth session)."""
        return self.method is None and SKINNY_MAX_M >= 1

    def takes_rms_in(self) -> bool:
        """Whether a one-row input may come as a PendingNorm with partial squares (gemv's `rms_in`:
        the input is the stream times the norm's weight, and the launch scales its results by
        1 / rms): 8-bit layers on gemv (RMS_SQUARES), where norm_in's per-element norm costs more
        than AddNorm's ticket. H100 W3 against AddNorm: FP8 with an FP8 lm_head 2.995 / 2.998 ->
        2.936 / 2.934 ms, INT8 3.448 -> 3.316 (docs/benchmarks.md, twenty-second session)."""
        return RMS_SQUARES and self.method is not None and self.method.one_row_gemv

    def _one_row_kernel(self, x: torch.Tensor, **epilogue: Any) -> torch.Tensor | None:
        """_one_row for an input already checked by _one_row_input."""
        if self.method is not None:
            return self.method.apply_one_row(self, x, **epilogue)
        if SKINNY_MAX_M < 1:
            return None
        from ..kernels.gemv import gemv

        if self.follows_attention:
            epilogue.setdefault("prefetch", AFTER_ATTENTION_PREFETCH)
        return gemv(x, self.weight, bias=self.bias, **epilogue)

    def silu_mul(self, x: torch.Tensor | PendingNorm) -> torch.Tensor | None:
        """silu(gate) * up [1, I] of a merged [gate; up] layer for one row x [1, K] on CUDA, in the
        projection's launch where its kernel can (kernels/gemv.silu_mul_epilogue); else None."""
        assert len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]
        return self._one_row(x, silu_mul=True) if FUSED_SILU else None

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, consumer: Linear | None = None
    ) -> tuple[torch.Tensor | PendingNorm, torch.Tensor]:
        """norm(self(x), residual): (normalized new stream, new stream). One row on CUDA (a batch-1
        decode step) takes one launch, the projection's, where its kernel can (kernels/gemv.AddNorm:
        the stream is updated in place); otherwise the projection and the norm run one after the other.
        `consumer`: the layer the normalized stream goes to. Where both one-row launches are gemv's,
        this one only adds into the stream and returns a PendingNorm, which the consumer normalizes
        as it reads it (DEFER_NORM); an 8-bit consumer takes the norm split between the two launches
        instead (RMS_SQUARES: kernels/gemv.AddSquares)."""
        if FUSED_NORM and residual.is_contiguous() and self._one_row_input(x):
            defer = DEFER_NORM and consumer is not None and self.runs_gemv()
            if defer and consumer.takes_norm_in() and self._one_row_kernel(x, add_into=residual) is not None:
                return PendingNorm(residual, norm), residual
            # bf16 only: r * w is stored unnormalized, and in fp16 it could pass 65,504 where the norm's
            # output would not
            if defer and consumer.takes_rms_in() and residual.dtype == torch.bfloat16:
                from ..kernels.gemv import AddSquares, one_row_programs

                squares = norm.partial_squares(one_row_programs(residual.shape[1]), x.device)
                scaled = self._one_row_kernel(x, add_squares=AddSquares(residual, norm.weight, squares))
                if scaled is not None:
                    return PendingNorm(residual, norm, scaled, squares), residual
            from ..kernels.gemv import AddNorm  # imports Triton: CUDA activations only

            y = self._one_row_kernel(x, add_norm=AddNorm(residual, norm.weight, norm.eps, norm.ticket))
            if y is not None:
                return y, residual
        return norm(self(x), residual)

    def float_output_argmax(self, x: torch.Tensor, best: torch.Tensor) -> torch.Tensor | None:
        """self(x) widened to float32 for one row, whose launch also folds the row's first maximum into `best`
        (int64 [1]; kernels/gemv.gemv's argmax_best, read by elementwise.argmax_finish); None where
        the layer's one-row kernel has no such epilogue (GPTQ, no one-row input)."""
        if not self.runs_gemv():
            return None
        return self._one_row(x, out_dtype=torch.float32, argmax_best=best)

    def sampling_output(self, x: torch.Tensor) -> torch.Tensor:
        """self(x) as logits for sampling: one row on CUDA in float32 from the projection's own
        launch (the 16-bit values, widened there at no cost), otherwise in the layer's output dtype,
        without a widening pass over [N, V] (sampling.sample_device reads 16-bit logits)."""
        y = self._one_row(x, out_dtype=torch.float32)
        return y if y is not None else self(x)
