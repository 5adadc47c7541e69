from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as transformers does), optionally fused with the residual add.

    `forward(x)` returns the normalized x; `forward(x, residual)` adds x into the residual first and
    returns (normalized sum, new residual) so the decoder carries one residual stream.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        # the ticket counter of the projection launches that end in this norm (kernels/gemv.AddNorm):
        # zero between launches; one per norm, so no two launches in flight share one
        self.register_buffer("ticket", torch.zeros(1, dtype=torch.int32), persistent=False)
        # float32 partial sums of squares, one per program of the projection launch that ends in
        # this norm under kernels/gemv.AddSquares, by (programs, device) (partial_squares; not a
        # buffer, which .to(dtype) would turn to 16 bits)
        self._squares: dict[tuple[int, torch.device], torch.Tensor] = {}

    def partial_squares(self, programs: int, device: torch.device) -> torch.Tensor:
        """The float32 [programs] partial sums a one-row AddSquares launch writes and its
        consumer's RmsIn reads (kernels/gemv.py). Made at the first such launch, which runs eagerly
        (cuda_graphs.capture_graph runs a step once before capturing it), and kept for the
        module's life: captured graphs hold its address."""
        key = (programs, torch.device(device))
        sq = self._squares.get(key)
        if sq is None:
            sq = self._squares[key] = torch.zeros(programs, dtype=torch.float32, device=device)
        return sq

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda and kernels.AVAILABLE and x.dim() == 2:
            from ..kernels.elementwise import rmsnorm

            out = rmsnorm(x, self.weight, self.eps, residual=residual)  # residual updated in place
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class PendingNorm(NamedTuple):
    """norm(residual) of one row, left for its consumer to compute: the projection before it only
    added into the residual stream (Linear.add_norm with a `consumer`), and the consumer's one-row
    launch normalizes the row as it reads it (kernels/gemv.NormIn); or, before an 8-bit consumer,
    the projection also wrote `scaled` (the stream times the norm's weight) and `squares` (its
    partial sums of squares), and the consumer's launch scales its results by 1 / rms
    (kernels/gemv.AddSquares, RmsIn). `value()` computes the norm for a consumer that cannot take
    either. The residual must not change before the consumer runs."""

    residual: torch.Tensor  # [1, hidden], the stream after the add
    norm: RMSNorm
    # under kernels/gemv.AddSquares (Linear.takes_rms_in consumers): the producer's output, the
    # new stream times the norm's weight, and its partial sums of squares
    scaled: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        out = self.norm(self.residual)
        assert isinstance(out, torch.Tensor)
        return out
