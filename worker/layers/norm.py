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
    launch normalizes the row as it reads it (kernels/gemv.NormIn). `value()` computes it for a
    consumer that cannot. The residual must not change before the consumer runs."""

    residual: torch.Tensor  # [1, hidden], the stream after the add
    norm: RMSNorm

    def value(self) -> torch.Tensor:
        out = self.norm(self.residual)
        assert isinstance(out, torch.Tensor)
        return out
