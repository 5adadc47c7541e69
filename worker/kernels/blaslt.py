"""16-bit projections at the row counts of the CUDA graphs, through cuBLASLt with the algorithm that
timed fastest for each (weight shape, rows) at startup.

`F.linear` lets cuBLAS pick one algorithm from its heuristics. At the 24-1,024 rows of decode and
mixed steps that pick is often not the fastest cuBLASLt has for the shape: on the H100, 32 launches
over distinct Llama-3.1-8B weights (bench/blas_sweep.py, docs/benchmarks.md, seventeenth session)
ran down_proj at 128 rows in 53.4 us each through F.linear and 44.7 through another cuBLASLt
algorithm, at 512 rows 91.1 against 80.2; gate_up at 512 rows 180.8 against 172.5. Where nothing
beats F.linear (qkv at most row counts), F.linear stays.

`tune(model, rows)` runs once after the weights load and before the graphs are captured: for every
group of same-shaped 16-bit weights without bias and every row count, it asks cuBLASLt's heuristics
for candidates under a few workspace limits (and tries the first of them with other custom options
and cluster shapes, VARIANT_*), checks each against F.linear on one weight, times
each over up to TUNE_WEIGHTS distinct weights of the group (so nothing is served from L2), queued
behind a GPU sleep (so the host's launch cost is not what is timed): once each, then F.linear and
the FINALISTS fastest TUNE_REPS times more. It keeps the fastest when that beats F.linear by more
than MARGIN. `linear(x, w)` then runs a kept plan for x's row count, or returns None (the
caller runs F.linear): the graphs only ever see the tuned row counts, eager steps mostly others.

cuBLASLt is called through ctypes on the library torch already loaded, so there is no new
dependency. INFERFLEET_GEMM_TUNE=0 turns it off (A/B measurements); CPU workers never load it.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

ENABLED = os.environ.get("INFERFLEET_GEMM_TUNE", "1") != "0"
# a candidate replaces F.linear only when it is faster by more than this fraction: below it the
# difference is within what two timings of one algorithm differ by, and F.linear is what the
# engine was measured with
MARGIN = 0.02
# distinct weights each candidate is timed over (a layer's weights are 32-470 MB for Llama-3.1-8B:
# eight of them exceed the H100's 50 MB L2 several times over)
TUNE_WEIGHTS = 8
# every candidate is timed once, then F.linear and the FINALISTS fastest TUNE_REPS times more
TUNE_REPS = 3
FINALISTS = 4
# GPU clock cycles the timing sleeps per queued launch before starting them (a launch through ctypes
# takes the host ~10 us; 30,000 cycles are ~15 us at the H100's 1.98 GHz)
HOST_CYCLES_PER_LAUNCH = 30_000
# a candidate's output against F.linear's, relative (Frobenius) error: two 16-bit roundings of the
# same float32 sums differ by ~3e-3
CHECK_TOLERANCE = 1e-2
# workspace cuBLASLt may use (32 MiB: NVIDIA's recommendation for Hopper) and the limits under which
# its heuristics are asked for candidates: each limit ranks a different set first
WORKSPACE_BYTES = 32 * 2**20
HEURISTIC_LIMITS = (0, 2**20, WORKSPACE_BYTES)
HEURISTIC_COUNT = 16
# Each of the first VARIANT_SOURCES heuristic algorithms is also tried with every custom option in
# VARIANT_CUSTOM and thread-block cluster shape in VARIANT_CLUSTERS (cublasLtMatmulAlgoCheck
# filters those the algorithm refuses). On the H100 the heuristics rank the nvjet kernels' tiles
# well but not those two settings: bench/lt_search.py (docs/benchmarks.md, twentieth session) timed
# a sample of 766-3,662 of the ~12,000-24,000 configurations cuBLASLt accepts per Llama-3.1-8B
# projection at 256 rows, and its fastest were heuristic tiles with another custom option and
# cluster shape: o 17.7 us against the heuristics' best 18.5, down 53.0 against 54.8, gate_up 98.3
# against 102.1 (qkv: no gain). AUTO (0) is not among the clusters: variants of custom options
# alone were not measured.
VARIANT_SOURCES = 2
VARIANT_CUSTOM = (0, 1, 2, 3, 4)
VARIANT_CLUSTERS = (2, 3, 5)
# the operand alignment cuBLASLt's heuristics assume unless told otherwise (its preference
# CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES defaults to 256): other pointers go to F.linear
ALIGNMENT = 256

# cublasLt.h / library_types.h values
_CUDA_R_16F, _CUDA_R_16BF, _CUDA_R_32F = 2, 14, 0
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE_BYTES = 1
_CONFIG_CUSTOM_OPTION, _CONFIG_CLUSTER_SHAPE = 5, 8  # cublasLtMatmulAlgoConfigAttributes_t
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", _Algo),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The libcublasLt torch loaded (its path from /proc/self/maps), else one by soname, with the
    signatures used here declared; None if neither loads. Found once per process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublasLt.so" in line}
    except OSError:
        paths = set()
    for name in [*sorted(paths), "libcublasLt.so.13", "libcublasLt.so.12"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    sigs = {
        "cublasLtCreate": [ctypes.POINTER(vp)],
        "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), i, i],
        "cublasLtMatmulDescSetAttribute": [vp, i, vp, sz],
        "cublasLtMatrixLayoutCreate": [
            ctypes.POINTER(vp),
            i,
            ctypes.c_uint64,
            ctypes.c_uint64,
            ctypes.c_int64,
        ],
        "cublasLtMatrixLayoutDestroy": [vp],
        "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i, vp, sz],
        "cublasLtMatmulPreferenceDestroy": [vp],
        "cublasLtMatmulAlgoGetHeuristic": [vp] * 7 + [i, ctypes.POINTER(_Heuristic), ctypes.POINTER(i)],
        "cublasLtMatmulAlgoConfigSetAttribute": [ctypes.POINTER(_Algo), i, vp, sz],
        # handle, desc, A, B, C, D layouts, algo, result
        "cublasLtMatmulAlgoCheck": [vp] * 6 + [ctypes.POINTER(_Algo), ctypes.POINTER(_Heuristic)],
        # handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace, size, stream
        "cublasLtMatmul": [vp] * 14 + [sz, vp],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@dataclass
class _Plan:
    """One (shape, rows) problem's layouts and the algorithm to run it with."""

    a: ctypes.c_void_p  # the weight [N, K] row-major, seen column-major as [K, N] and transposed
    b: ctypes.c_void_p  # x [M, K] row-major = [K, M] column-major
    c: ctypes.c_void_p  # y [M, N] row-major = [N, M] column-major
    algo: _Algo
    m: int
    n: int


class Lt:
    """cuBLASLt on one device: a handle, one operation descriptor (y = x W^T, float32 accumulation
    and scales; the 16-bit type is the layouts'), a shared workspace, and the tuned plans by
    (dtype, N, K, M)."""

    def __init__(self, lib: ctypes.CDLL, device: torch.device) -> None:
        self.lib, self.device = lib, device
        self.handle = ctypes.c_void_p()
        _check(lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _CUDA_R_32F), "desc")
        for attr, value in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(value)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "desc attribute")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.plans: dict[tuple[torch.dtype, int, int, int], _Plan] = {}
        self.tuned: set[tuple[torch.dtype, int, int, int]] = set()  # problems timed, picked or not
        self.report: list[dict] = []  # one entry per tuned problem: us per launch of F.linear and the pick

    def _layout(self, dtype: torch.dtype, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        _check(
            self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(out), _DTYPES[dtype], rows, cols, ld), "layout"
        )
        return out

    def _candidates(self, dtype: torch.dtype, n: int, k: int, m: int, variants: bool = True) -> list[_Plan]:
        """The heuristics' algorithms for [m, k] x [n, k]^T under each of HEURISTIC_LIMITS, deduplicated,
        and with `variants` the VARIANT_* configurations of the first of them."""
        a, b, c = self._layout(dtype, k, n, k), self._layout(dtype, k, m, k), self._layout(dtype, n, m, n)
        seen, plans = set(), []
        for limit in HEURISTIC_LIMITS:
            pref = ctypes.c_void_p()
            _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
            cap = ctypes.c_uint64(limit)
            self.lib.cublasLtMatmulPreferenceSetAttribute(
                pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(cap), 8
            )
            results = (_Heuristic * HEURISTIC_COUNT)()
            found = ctypes.c_int(0)
            status = self.lib.cublasLtMatmulAlgoGetHeuristic(
                self.handle, self.desc, a, b, c, c, pref, HEURISTIC_COUNT, results, ctypes.byref(found)
            )
            self.lib.cublasLtMatmulPreferenceDestroy(pref)
            if status != 0:
                continue
            for r in results[: found.value]:
                key = bytes(r.algo)
                if r.state == 0 and r.workspace_size <= WORKSPACE_BYTES and key not in seen:
                    seen.add(key)
                    algo = _Algo()
                    ctypes.memmove(ctypes.byref(algo), ctypes.byref(r.algo), ctypes.sizeof(_Algo))
                    plans.append(_Plan(a, b, c, algo, m, n))
        for source in plans[: VARIANT_SOURCES if variants else 0]:
            for custom, cluster in itertools.product(VARIANT_CUSTOM, VARIANT_CLUSTERS):
                settings = (
                    (_CONFIG_CUSTOM_OPTION, ctypes.c_uint32(custom)),
                    (_CONFIG_CLUSTER_SHAPE, ctypes.c_uint16(cluster)),
                )
                algo = self.configured(source.algo, settings, a, b, c)
                if algo is not None and bytes(algo) not in seen:
                    seen.add(bytes(algo))
                    plans.append(_Plan(a, b, c, algo, m, n))
        if not plans:
            self._free_layouts(a, b, c)
        return plans

    def configured(
        self, algo: _Algo, settings: Iterable[tuple[int, ctypes._SimpleCData]], *layouts: ctypes.c_void_p
    ) -> _Algo | None:
        """A copy of `algo` with each (cublasLtMatmulAlgoConfigAttributes_t, ctypes value) of
        `settings` set, if cuBLASLt takes every value and accepts the result for these layouts
        (A, B, C) within WORKSPACE_BYTES; else None."""
        out = _Algo()
        ctypes.memmove(ctypes.byref(out), ctypes.byref(algo), ctypes.sizeof(_Algo))
        for attr, value in settings:
            if self.lib.cublasLtMatmulAlgoConfigSetAttribute(
                ctypes.byref(out), attr, ctypes.byref(value), ctypes.sizeof(value)
            ):
                return None
        a, b, c = layouts
        result = _Heuristic()
        status = self.lib.cublasLtMatmulAlgoCheck(
            self.handle, self.desc, a, b, c, c, ctypes.byref(out), ctypes.byref(result)
        )
        ok = status == 0 and result.state == 0 and result.workspace_size <= WORKSPACE_BYTES
        return out if ok else None

    def _free_layouts(self, *layouts: ctypes.c_void_p) -> None:
        for layout in layouts:
            self.lib.cublasLtMatrixLayoutDestroy(layout)

    def run(self, plan: _Plan, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty((plan.m, plan.n), dtype=x.dtype, device=x.device)
        _check(
            self.lib.cublasLtMatmul(
                self.handle, self.desc, ctypes.addressof(self._one), w.data_ptr(), plan.a, x.data_ptr(),
                plan.b, ctypes.addressof(self._zero), y.data_ptr(), plan.c, y.data_ptr(), plan.c,
                ctypes.addressof(plan.algo), self.workspace.data_ptr(), WORKSPACE_BYTES,
                torch.cuda.current_stream(x.device).cuda_stream,
            ),
            "matmul",
        )  # fmt: skip
        return y

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 2 or x.shape[1] != w.shape[1]:
            return None
        plan = self.plans.get((x.dtype, w.shape[0], w.shape[1], x.shape[0]))
        if plan is None or w.dtype != x.dtype or not (x.is_contiguous() and w.is_contiguous()):
            return None
        if (x.data_ptr() | w.data_ptr()) % ALIGNMENT:  # a view into a tensor, off the heuristics' alignment
            return None
        return self.run(plan, x, w)

    def planned_rows(self, w: torch.Tensor, m: int) -> int | None:
        """The fewest rows >= m at which a tuned plan runs x @ w^T, or None."""
        rows = [
            r for (dt, n, k, r) in self.plans if (dt, n, k) == (w.dtype, w.shape[0], w.shape[1]) and r >= m
        ]
        return min(rows, default=None)

    def tune(self, weights: list[torch.Tensor], m: int) -> None:
        """Time F.linear and every candidate at m rows over `weights` (same shape and dtype); keep
        the fastest candidate if it beats F.linear by more than MARGIN."""
        w0 = weights[0]
        n, k, dtype = w0.shape[0], w0.shape[1], w0.dtype
        key = (dtype, n, k, m)
        if key in self.tuned:  # another engine in this process tuned the shape: its pick holds
            return
        self.tuned.add(key)
        ws = weights[:TUNE_WEIGHTS]
        x = torch.randn(m, k, device=self.device, dtype=dtype) * 0.5
        ref = F.linear(x, w0).float()
        checked, errs = [], []  # every candidate against F.linear on one weight, one sync for all
        candidates = self._candidates(dtype, n, k, m)
        for plan in candidates:
            try:
                got = self.run(plan, x, w0).float()
            except RuntimeError:  # listed but refused for these pointers: skip it
                continue
            checked.append(plan)
            errs.append((got - ref).norm() / ref.norm())
        ok = [p for p, e in zip(checked, torch.stack(errs).tolist() if errs else []) if e < CHECK_TOLERANCE]
        routes: list[_Plan | None] = [None, *ok]  # None: F.linear

        def launches(route: _Plan | None) -> None:
            for w in ws:
                if route is None:
                    F.linear(x, w)
                else:
                    self.run(route, x, w)

        # one pass over every route, then TUNE_REPS more over F.linear and the fastest FINALISTS
        first = _time_queued([lambda r=r: launches(r) for r in routes], 1, len(ws))
        finals = [0, *sorted(range(1, len(routes)), key=first.__getitem__)[:FINALISTS]]
        us = _time_queued([lambda i=i: launches(routes[i]) for i in finals], TUNE_REPS, len(ws))
        base = us[0] / len(ws)
        best_us = min(us[1:], default=float("inf")) / len(ws)
        best = routes[finals[1 + us[1:].index(min(us[1:]))]] if len(us) > 1 else None
        picked = best is not None and best_us < base * (1 - MARGIN)
        if picked:
            self.plans[key] = best
        elif candidates:  # the candidates share one problem's layouts
            self._free_layouts(candidates[0].a, candidates[0].b, candidates[0].c)
        self.report.append(
            {
                "n": n,
                "k": k,
                "m": m,
                "candidates": len(ok),
                "linear_us": base,
                "best_us": best_us if best is not None else None,
                "cublaslt": picked,
            }
        )


def _time_queued(fns: list, reps: int, launches_each: int) -> list[float]:
    """us per call of each fn (median of `reps`, the calls interleaved fn by fn), timed on the GPU
    between events. The GPU first sleeps long enough for the host to queue every call, so the host's
    time to launch them (ctypes, Python) is not what gets timed; F.linear is called once before."""
    fns[0]()
    torch.cuda.synchronize()
    marks = [[torch.cuda.Event(enable_timing=True) for _ in range(reps)] for _ in fns]
    ends = [[torch.cuda.Event(enable_timing=True) for _ in range(reps)] for _ in fns]
    torch.cuda._sleep(HOST_CYCLES_PER_LAUNCH * launches_each * len(fns) * reps)
    for r in range(reps):
        for i, fn in enumerate(fns):
            marks[i][r].record()
            fn()
            ends[i][r].record()
    torch.cuda.synchronize()
    return [
        sorted(marks[i][r].elapsed_time(ends[i][r]) * 1e3 for r in range(reps))[reps // 2]
        for i in range(len(fns))
    ]


_LT: dict[int, Lt] = {}


def get(device: torch.device) -> Lt | None:
    """This device's tuned cuBLASLt, if tune() ran on it."""
    return _LT.get(_index(device)) if device.type == "cuda" else None


def _index(device: torch.device) -> int:
    return device.index or 0  # "cuda" without an index: the current device, 0 in a worker


def tunable_groups(
    model: nn.Module, rows: list[int], head_rows: list[int]
) -> list[tuple[list[torch.Tensor], list[int]]]:
    """The model's 16-bit CUDA projection weights without bias (worker/layers/linear.Linear, no
    quantization method), grouped by (dtype, N, K) in module order, each group with the row counts
    to tune it at: `head_rows` for the model's lm_head (it sees the sampled rows only), `rows` for
    the rest."""
    from ..layers.linear import Linear

    head = getattr(model, "lm_head", None)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.method is None and mod.bias is None:
            w = mod.weight
            if w.is_cuda and w.dtype in _DTYPES and w.dim() == 2 and w.is_contiguous():
                r = tuple(head_rows if mod is head else rows)
                groups.setdefault((w.dtype, w.shape[0], w.shape[1], r), []).append(w)
    return [(ws, list(key[3])) for key, ws in groups.items() if key[3]]


def tune(model: nn.Module, rows: list[int], head_rows: list[int], device: torch.device) -> float | None:
    """Tune every weight group of `model` (tunable_groups) at its row counts; returns the seconds it
    took, or None where it does not run (turned off, no CUDA, no cuBLASLt, nothing to tune)."""
    if not ENABLED or device.type != "cuda":
        return None
    groups = tunable_groups(model, rows, head_rows)
    if not groups:
        return None
    lib = _library()
    if lib is None:
        log.warning("cuBLASLt not found: projections stay on F.linear's pick")
        return None
    t0 = time.perf_counter()
    with torch.cuda.device(device):
        lt = _LT.get(_index(device)) or Lt(lib, device)
        for weights, group_rows in groups:
            for m in group_rows:
                lt.tune(weights, m)
        torch.cuda.synchronize(device)
    _LT[_index(device)] = lt
    seconds = time.perf_counter() - t0
    picked = [r for r in lt.report if r["cublaslt"]]
    saved = sum(r["linear_us"] - r["best_us"] for r in picked)
    log.info(
        "GEMM tuning: %d of %d (shape, rows) problems run another cuBLASLt algorithm than F.linear's "
        "(%.1f us per launch saved in all), %.2fs",
        len(picked),
        len(lt.report),
        saved,
        seconds,
    )
    return seconds
