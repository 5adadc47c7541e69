"""Can a stream-K Triton GEMM beat cuBLAS at W1's mixed-step shape (256 rows) on the H100? A probe.

cuBLAS at 256 rows runs the projections at 1.8-2.3 TB/s of weights (o 18.6 us, qkv 24.6, gate_up
101, down 54; bench/gemm_tuning_report.py): few output tiles for the SMs (o: 32 tiles of 256 x 128
on 132 SMs) or a last wave partly empty (gate_up: 224 tiles, 1.7 waves). Stream-K gives each of P
programs an equal run of the (tile, K step) iterations, so every SM streams the same share of the
weights; a tile split between programs is summed by the last of them to finish (a ticket per tile,
float32 partials in a workspace), the others' partials read from L2.

Each launch is checked against a float32 reference before it is timed; timings are replays of one
CUDA graph of 16 launches over 8 distinct weights (nothing served from L2), as in gemm_probe.py.

    python bench/streamk_probe.py --out DIR [--rows 256] [--shapes qkv,o,gate_up,down]
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from gemm_probe import DEV, checked_us, probe_args, problems, result, save, time_us
from inferfleet.worker.kernels import LAUNCH_OPTIONS, num_sms
from torch.nn import functional as F


@triton.jit
def _streamk_kernel(
    a_ptr, w_ptr, c_ptr, ws_ptr, tick_ptr, M, N, K, total, ipt, tiles_m,
    P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # C [M, N] = A [M, K] @ W [N, K]^T. Iteration i = tile * ipt + k step; tile = pn * tiles_m + pm
    # (a weight tile's row tiles run on neighbouring programs, so it comes from DRAM once).
    pid = tl.program_id(0)
    start = pid * total // P
    end = (pid + 1) * total // P
    it = start
    rk = tl.arange(0, BK)
    while it < end:
        tile = it // ipt
        t0 = tile * ipt
        k_lo = it - t0
        k_hi = tl.minimum(end, t0 + ipt) - t0
        pm = tile % tiles_m
        pn = tile // tiles_m
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        a = a_ptr + rm[:, None].to(tl.int64) * K + (k_lo * BK + rk)[None, :]
        w = w_ptr + rn[:, None].to(tl.int64) * K + (k_lo * BK + rk)[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(k_lo, k_hi):
            at = tl.load(a, mask=rm[:, None] < M, other=0.0)
            acc = tl.dot(at, tl.trans(tl.load(w)), acc)
            a += BK
            w += BK
        c = c_ptr + rm[:, None] * N + rn[None, :]
        if (k_lo == 0) & (k_hi == ipt):
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] < M)
        else:
            slot = tl.where(it == start, 0, 1)
            tile_at = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
            tl.store(ws_ptr + (pid * 2 + slot) * BM * BN + tile_at, acc)
            # contributors: the programs whose runs meet [t0, t0 + ipt)
            p_first = ((t0 + 1) * P - 1) // total
            p_last = ((t0 + ipt) * P - 1) // total
            tl.debug_barrier()
            if tl.atomic_add(tick_ptr + tile, 1, sem="acq_rel", scope="gpu") == p_last - p_first:
                acc = tl.zeros((BM, BN), dtype=tl.float32)
                for q in range(p_first, p_last + 1):
                    q_slot = tl.where(q * total // P >= t0, 0, 1)
                    acc += tl.load(ws_ptr + (q * 2 + q_slot) * BM * BN + tile_at)
                tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] < M)
                tl.store(tick_ptr + tile, 0)
        it = t0 + k_hi


class StreamK:
    def __init__(
        self, m: int, n: int, k: int, bm: int, bn: int, bk: int, programs: int, warps: int, stages: int
    ):
        self.tiles_m = triton.cdiv(m, bm)
        tiles = self.tiles_m * (n // bn)
        self.ipt = k // bk
        self.total = tiles * self.ipt
        self.p = min(programs, self.total)
        self.cfg = (bm, bn, bk, warps, stages)
        self.ws = torch.empty(self.p * 2 * bm * bn, device=DEV, dtype=torch.float32)
        self.tick = torch.zeros(tiles, device=DEV, dtype=torch.int32)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        bm, bn, bk, warps, stages = self.cfg
        m, k = x.shape
        _streamk_kernel[(self.p,)](
            x, w, out, self.ws, self.tick, m, w.shape[0], k, self.total, self.ipt, self.tiles_m,
            P=self.p, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS,
        )  # fmt: skip
        return out


def main() -> None:
    args = probe_args("o,qkv,down,gate_up").parse_args()
    torch.manual_seed(0)
    sms = num_sms(DEV)
    res = result(sms=sms)
    configs = [
        (bm, bn, 64, w, s, p)
        for bm, bn, w, s, p in itertools.product((128, 256), (64, 128), (4, 8), (3, 4, 5), (sms, 2 * sms))
        if not (bm == 256 and w == 4) and not (bm == 256 and bn == 128 and s == 5) and not (bm == 128 and s == 5)
        and not (bm == 256 and p == 2 * sms)
    ]  # fmt: skip
    for m, name, n, k, x, ws, ref in problems(args.rows, args.shapes):
        flops = 2 * m * n * k
        tbytes = n * k * 2 / 1e6  # MB: MB per us is TB/s
        row: dict = {"cublas": time_us(lambda j: F.linear(x, ws[j]))}
        out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
        for bm, bn, bk, warps, stages, p in configs:
            key = f"bm{bm} bn{bn} bk{bk} w{warps} s{stages} p{p}"
            sk = StreamK(m, n, k, bm, bn, bk, p, warps, stages)

            def poisoned(sk: StreamK = sk) -> None:
                # checked on its second launch (the first must leave its tickets at zero), into
                # an output of NaNs: a tile it fails to write cannot pass
                sk(x, ws[0], out)
                out.fill_(float("nan"))

            row[key] = checked_us(lambda j, sk=sk: sk(x, ws[j], out), ref, 1e-2, reset=poisoned)
            if isinstance(row[key], float) and int(sk.tick.abs().sum()):
                row[key] = f"tickets left at {sk.tick.tolist()}"
        res["cases"][f"{name} m{m}"] = row
        timed = sorted((v, kk) for kk, v in row.items() if isinstance(v, float) and kk != "cublas")
        errors = [f"{kk}: {v}" for kk, v in row.items() if not isinstance(v, float)]
        cb = row["cublas"]
        print(
            f"{name} m{m}: cublas {cb:.1f} us ({tbytes / cb:.2f} TB/s, {flops / cb / 1e6:.0f} TFLOP/s)",
            flush=True,
        )
        for v, kk in timed[:4]:
            print(
                f"    {kk:32s} {v:8.1f} us ({tbytes / v:.2f} TB/s, {flops / v / 1e6:.0f} TFLOP/s)",
                flush=True,
            )
        for e in errors[:3]:
            print(f"    not run: {e}")
    save(args.out, "streamk_probe.json", res)


if __name__ == "__main__":
    main()
