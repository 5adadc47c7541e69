"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one linear layer, and round-to-nearest to compare.

Given W [N, K] and the layer's input statistics H = 2/n sum_x x x^T [K, K], GPTQ quantizes the
columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian, so that ||W X - Q X||^2 (not ||W - Q||^2) is small:

    H += damp * mean(diag H) * I                       (dampening keeps the Cholesky stable)
    U = chol(H^-1)^T   (upper)                         the rows of U give each step's update
    for each block of B = 128 columns (lazy batch: the trailing columns get one GEMM per block):
        for column j in the block:
            (new group at j: scale/zero from the group's current, already-updated, columns)
            q_j = quant(w_j);  e_j = (w_j - q_j) / U[j, j]
            W[:, j:block_end] -= e_j U[j, j:block_end]
        W[:, block_end:] -= E_block U[block, block_end:]

Act-order (desc_act) visits the columns in order of decreasing diag(H), the inputs with the most
energy first, while the most columns remain to absorb their error; groups are then runs of the
permuted order and g_idx maps every original column to its group.

Rows are independent (the update only mixes columns), so quantizing a merged qkv or gate_up
matrix gives exactly what quantizing q, k, v (or gate, up) separately would: they share the input,
hence H and the act-order permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError


@dataclass
class QuantResult:
    """A quantized matrix in original column order: W ~= scales[g_idx] * (codes - zeros[g_idx])."""

    codes: torch.Tensor  # [N, K] int32 in [0, 2^bits)
    scales: torch.Tensor  # [G, N] float32
    zeros: torch.Tensor  # [G, N] int32
    g_idx: torch.Tensor  # [K] int32
    dequant: torch.Tensor  # [N, K] float32: the matrix the quantized layer computes with


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of one group w [N, g] -> (scale [N], zero [N]), zero an integer.

    As AutoGPTQ's Quantizer, with 0 always inside the range; symmetric grids are centred on zero
    2^(bits-1) with the range set by max |w| (also for rows without negative values)."""
    maxq = 2**bits - 1
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp_(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    """Round to nearest with the same grid per group: the baseline GPTQ must beat."""
    w = w.float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    codes = torch.empty((n, k), dtype=torch.int32, device=w.device)
    deq = torch.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, k, gs):
        blk = w[:, g0 : g0 + gs]
        scale, zero = find_params(blk, bits, sym)
        c = quantize_codes(blk, scale[:, None], zero[:, None], bits)
        codes[:, g0 : g0 + gs] = c.to(torch.int32)
        deq[:, g0 : g0 + gs] = scale[:, None] * (c - zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(k, device=w.device) // gs).to(torch.int32)
    return QuantResult(codes, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx, deq)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantResult:
    """GPTQ for W [N, K] given H [K, K] (float32; neither is modified)."""
    w = w.float().clone()
    h = h.float().clone()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise InvalidRequestError(
            f"the damped Hessian is not positive definite (damp={damp}); raise --damp", param="damp"
        )
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)

    codes = torch.zeros((n, k), dtype=torch.int32, device=w.device)
    deq = torch.zeros_like(w)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = torch.empty(0)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # the group's columns as they stand now: in-block ones carry this block's updates,
                # later ones the pending lazy update of the columns already done in this block
                end = min(col + gs, k)
                grp = w1[:, i : min(end, i2) - i1]
                if end > i2:
                    later = w[:, i2:end] - err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
                    grp = torch.cat([grp, later], dim=1)
                scale, zero = find_params(grp, bits, sym)
                scales.append(scale)
                zeros.append(zero)
            x = w1[:, i]
            c = quantize_codes(x, scale, zero, bits)
            q = scale * (c - zero)
            codes[:, col] = c.to(torch.int32)
            deq[:, col] = q
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    g_idx = (torch.arange(k, device=w.device) // gs).to(torch.int32)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq, g_idx = codes[:, inv], deq[:, inv], g_idx[inv]
    return QuantResult(codes, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx, deq)


def reconstruction_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - Q X||_F^2 / n up to the constant of H: trace((W - Q) H (W - Q)^T), H undamped."""
    d = (w.double() - q.double()).to(h.device)
    return float(((d @ h.double()) * d).sum())
