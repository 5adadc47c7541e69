"""GPTQ 4-bit decode for one row of activations (W3's batch 1): a Gluon kernel, one packed word at
a time.

kernels/gptq_gemm.py's Triton one-row kernel spent ~18 instructions per code in its loop (scale
and zero gathered per element, an int->float conversion per zero) and streamed 1.2 TB/s of packed
weights. Here the layout is explicit (Gluon) so that every thread owns ROWS weight rows x a run of
WPT consecutive words inside one group, and the work per word is fixed in PTX (`_WORD_DOT_ASM`):
- the 8 codes of a word become four fp16 pairs by one lop3 each with the exponent of 1024 (Marlin's
  magic number: the bits 0x6400 | q are the half 1024 + q; codes in bits 4-7 give 1024 + 16 q,
  scaled by 1/16 in the same fma that subtracts 64 + z), and one sub or fma per pair gives q - z
  exactly;
- each code is widened once (cvt.f32.f16) and multiplied into a float32 dot with x, so the word's
  partial sum sum_j (q_j - z) x_j is exact up to float32 rounding, and the group scale multiplies it
  once per word: the weights are the exact s (q - z), as in the Triton path.
The scale and zero are loaded once per thread run (one group), x once per thread for all its rows
(16-bit pairs as one 32-bit load, bf16 widened by shifts). Fewer instructions alone (~4.5-5 per
code in SASS) did not pay: each tile then waited on its scales and zeros (streamed from DRAM with
the weights) and on x. So everything of the next tile is loaded before the current one is
computed, the per-thread footprint is small enough for many resident warps, and under PDL the first
tile's weights are loaded before the wait. H100 sweeps and numbers: docs/benchmarks.md.

The default launches (sixth session) take the products in fp16 pairs instead (`_WORD_DOT16_ASM`,
CHAINS 0, the precision of exllama's and Marlin's kernels): one fma per pair gives (q - z) / 16
exactly, one fma per pair multiplies it into an fp16 sum with x converted to fp16 pairs once per
thread and tile, and each thread run's sums are widened to float32 once and scaled: 3.6-4.2
instructions per code in the loop's SASS for the default launches against 5.1-5.2 for the fifth
session's (bench/row4_sass.py), and the relative error of a layer's output on the 8B
shapes moves from 1.64-1.70e-3 to 1.68-1.72e-3 (bench/gemv_bench.py's checks; the bf16 rounding of
the output is most of both). Some shapes also keep two tiles in flight in registers (DEPTH 2).
Staging the words through shared memory with cp.async, three to six tiles deep, was slower at
every shape (docs/benchmarks.md): the loop is bound by issue and latency per tile, not by bytes in
flight.

Codes, scales and zeros are in gptq_gemm.py's layout: qweight_t int32 [N, K / 8] (code of W[n, k] in
bits 4 (k % 8) of word k // 8), scales_t fp16 [N, G], zeros_t uint8 [N, G], contiguous groups.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from . import LAUNCH_OPTIONS, pdl
from .gemv import AddNorm, epilogue_args

# fp16 products (CHAINS 0): a thread run's lane sums add 4 WPT products of at most 15 / 16 |x|
FP16_MAX = 65504.0


def fp16_products_hold(input_bound: float | None, wpt: int) -> bool:
    """Whether inputs no larger than `input_bound` in magnitude keep every fp16 lane sum of a run
    of `wpt` words finite (False for an unknown bound)."""
    return input_bound is not None and input_bound * 4 * wpt * 15 / 16 < FP16_MAX


def default_config(n: int) -> tuple[int, int, int, int, int, int]:
    """The launch (rows per thread, words per thread run, warps along N, warps along K, products:
    1 or 2 float32 chains per word or 0 for fp16 pairs, weight tiles in flight: 1 or 2) by output
    rows, from the H100 sweeps of bench/gemv_bench.py (docs/bench/2026-11-25-h100-s6-gemv-gptq-*.json):
    products in fp16 pairs for every shape; up to 4,096 rows (o, down) 8 warps over [16 rows, 1,024
    columns] tiles, two in flight (1,566 and 2,027 GB/s against 1,466 and 1,890 for the fifth
    session's launch in the same sweep); up to 8,192 (qkv) 4 warps over [16, 1,024] tiles, two in
    flight (2,003 against 1,737); the widest layers (gate_up) 4 warps over [8, 1,024], one in
    flight (2,433 against 2,132); a vocabulary-sized lm_head (a GPTQ checkpoint with lm_head
    quantized) 4 warps over [32, 1,024] tiles (2,769 against 2,678 GB/s for gate_up's launch,
    ...-s7-gemv-gptq-lm-head.json). Seventh-session launches with four warps along K (a 4,096-column
    row in two tiles, both in flight) or two rows per thread were slower at every decoder shape."""
    if n <= 4096:
        return 4, 2, 4, 2, 0, 2
    if n <= 8192:
        return 8, 2, 2, 2, 0, 2
    return (4, 2, 2, 2, 0, 1) if n <= 65536 else (16, 2, 2, 2, 0, 1)


# the 8 codes of word $1 -> four fp16 pairs t0..t3: (1024 + q0, 1024 + q4), (1024 + 16 q1,
# 1024 + 16 q5), (1024 + q2, 1024 + q6), (1024 + 16 q3, 1024 + 16 q7), one lop3 each (w8: $1 >> 8)
_UNPACK_PTX = """lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 w8, $1, 8;
lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
"""

# one 4-bit word -> sum_j (q_j - z) * x_j over its 8 codes, in float32:
# codes land in fp16 halves as 1024 + q (bits 0-3) or 1024 + 16 q (bits 4-7) by one lop3 each
# (Marlin's magic-number trick); one sub / fma per pair gives q - z exactly; cvt + fma per code.
_WORD_DOT_ASM = gl.constexpr(
    """
{
.reg .b32 t0, t1, t2, t3, w8, c16;
.reg .b16 h0, h1, h2, h3, h4, h5, h6, h7;
.reg .f32 f0, f1, f2, f3, f4, f5, f6, f7;
"""
    + _UNPACK_PTX
    + """mov.b32 c16, 0x2C002C00;
sub.f16x2 t0, t0, $2;
sub.f16x2 t2, t2, $2;
fma.rn.f16x2 t1, t1, c16, $3;
fma.rn.f16x2 t3, t3, c16, $3;
mov.b32 {h0, h4}, t0;
mov.b32 {h1, h5}, t1;
mov.b32 {h2, h6}, t2;
mov.b32 {h3, h7}, t3;
cvt.f32.f16 f0, h0;
cvt.f32.f16 f1, h1;
cvt.f32.f16 f2, h2;
cvt.f32.f16 f3, h3;
cvt.f32.f16 f4, h4;
cvt.f32.f16 f5, h5;
cvt.f32.f16 f6, h6;
cvt.f32.f16 f7, h7;
mul.f32 $0, f0, $4;
fma.rn.f32 $0, f1, $5, $0;
fma.rn.f32 $0, f2, $6, $0;
fma.rn.f32 $0, f3, $7, $0;
fma.rn.f32 $0, f4, $8, $0;
fma.rn.f32 $0, f5, $9, $0;
fma.rn.f32 $0, f6, $10, $0;
fma.rn.f32 $0, f7, $11, $0;
}
"""
)
# the same with the eight products in two independent chains of four (half the dependent latency)
_WORD_DOT2_ASM = gl.constexpr(
    _WORD_DOT_ASM.value.replace(
        """fma.rn.f32 $0, f4, $8, $0;
fma.rn.f32 $0, f5, $9, $0;
fma.rn.f32 $0, f6, $10, $0;
fma.rn.f32 $0, f7, $11, $0;""",
        """mul.f32 f0, f4, $8;
fma.rn.f32 f0, f5, $9, f0;
fma.rn.f32 f0, f6, $10, f0;
fma.rn.f32 f0, f7, $11, f0;
add.f32 $0, $0, f0;""",
    )
)


# the same word with the products in fp16 pairs (exllama's and Marlin's precision: 16-bit products,
# here summed in fp16 over a thread's run of words and widened once per run): the lop3 halves as
# above; one fma per pair gives (q - z) / 16 exactly ($2: -(64 + z / 16) for 1024 + q, $3:
# -(4 + z / 16) for (1024 + 16 q) / 256); one mul / fma per pair with x's fp16 pairs ($4..$7: (x0, x4),
# (x1, x5), (x2, x6), (x3, x7), the pair order the lop3 leaves the codes in). The result is the
# word's two fp16 lane sums. The 1 / 16 keeps a run's lane sums (4 WPT products of at most 15 / 16 |x|)
# within fp16 while |x| < ~17,000 / WPT (the caller multiplies the scale by 16).
_WORD_DOT16_ASM = gl.constexpr(
    """
{
.reg .b32 t0, t1, t2, t3, w8, c16, c256;
"""
    + _UNPACK_PTX
    + """mov.b32 c16, 0x2C002C00;
mov.b32 c256, 0x1C001C00;
fma.rn.f16x2 t0, t0, c16, $2;
fma.rn.f16x2 t1, t1, c256, $3;
fma.rn.f16x2 t2, t2, c16, $2;
fma.rn.f16x2 t3, t3, c256, $3;
mul.rn.f16x2 $0, t0, $4;
fma.rn.f16x2 $0, t1, $5, $0;
fma.rn.f16x2 $0, t2, $6, $0;
fma.rn.f16x2 $0, t3, $7, $0;
}
"""
)
# x of one word (four 32-bit pairs (x0, x1) .. (x6, x7), 16-bit each) -> the fp16 pairs above
_X_PAIRS_BF16_ASM = gl.constexpr("""
{
.reg .b32 a0, a1, a2, a3, b0, b1, b2, b3;
shl.b32 a0, $4, 16;
and.b32 a1, $4, 0xFFFF0000;
shl.b32 a2, $5, 16;
and.b32 a3, $5, 0xFFFF0000;
shl.b32 b0, $6, 16;
and.b32 b1, $6, 0xFFFF0000;
shl.b32 b2, $7, 16;
and.b32 b3, $7, 0xFFFF0000;
cvt.rn.f16x2.f32 $0, b0, a0;
cvt.rn.f16x2.f32 $1, b1, a1;
cvt.rn.f16x2.f32 $2, b2, a2;
cvt.rn.f16x2.f32 $3, b3, a3;
}
""")
_X_PAIRS_F16_ASM = gl.constexpr("""
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
""")


@gluon.jit
def _word_dot(words, z, x0, x1, x2, x3, x4, x5, x6, x7, CHAINS: gl.constexpr):
    """sum_j (q_j - z) * x_j over the 8 codes of each int32 word, in float32 (see _WORD_DOT_ASM)."""
    zi = z.to(gl.int32)
    zz = (zi | 0x6400) * 0x10001  # 1024 + z in both fp16 halves
    zz16 = (0xD400 | (zi << 4)) * 0x10001  # -(64 + z) in both halves
    return gl.inline_asm_elementwise(
        _WORD_DOT2_ASM if CHAINS == 2 else _WORD_DOT_ASM, "=f,r,r,r,f,f,f,f,f,f,f,f",
        [words, zz, zz16, x0, x1, x2, x3, x4, x5, x6, x7],
        dtype=gl.float32, is_pure=True, pack=1,
    )  # fmt: skip


@gluon.jit
def _word_dot16(words, z, xa, xb, xc, xd):
    """Each word's two fp16 lane sums of (q_j - z) * x_j / 16 (_WORD_DOT16_ASM), as int32 bits."""
    zi = z.to(gl.int32)
    z0 = zi * 0x10001 - 0x2BFF2C00  # 0xD400D400 + z in each half: -(64 + z / 16) in both fp16 halves
    z1 = zi * 0x100010 - 0x3BFF3C00  # 0xC400C400 + 16 z in each half: -(4 + z / 16)
    return gl.inline_asm_elementwise(
        _WORD_DOT16_ASM, "=r,r,r,r,r,r,r,r", [words, z0, z1, xa, xb, xc, xd],
        dtype=gl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@gluon.jit
def _hadd2(a, b):
    """Two fp16 pairs (int32 bits) added lane-wise."""
    return gl.inline_asm_elementwise(
        "add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _hsum_f32(a):
    """An fp16 pair (int32 bits) -> the sum of its lanes in float32."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 h0, h1; .reg .f32 f0, f1; mov.b32 {h0, h1}, $1; cvt.f32.f16 f0, h0; "
        "cvt.f32.f16 f1, h1; add.f32 $0, f0, f1; }",
        "=f,r", [a], dtype=gl.float32, is_pure=True, pack=1,
    )  # fmt: skip


@gluon.jit
def _row4_fetch_w(
    qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, k0, KW, G, stride_w,
    GROUP: gl.constexpr, MASKED: gl.constexpr,
):  # fmt: skip
    """The weight side of the tile at K column k0, as loaded (nothing here waits for the data):
    words [BLOCK_N, CW, WPT] (wcol: word index inside the tile) and the scale and zero of each
    thread run [BLOCK_N, CW] (cstart: the run's first column; a run lies inside one group)."""
    qw, w_ok = _row4_word_ptrs(qw_ptr, rows64, n_ok, wcol, k0, KW, stride_w)
    if MASKED:
        words = gl.load(qw, mask=w_ok, other=0)
    else:
        words = gl.load(qw)
    s, z = _row4_fetch_sz(s_ptr, z_ptr, rows64, n_ok, cstart, k0, G, GROUP, MASKED)
    return words, s, z


@gluon.jit
def _row4_word_ptrs(qw_ptr, rows64, n_ok, wcol, k0, KW, stride_w):
    """Pointers to the tile's words at K column k0 [BLOCK_N, CW, WPT], and which lie inside W."""
    w = k0 // 8 + wcol
    return gl.expand_dims(qw_ptr + rows64 * stride_w, 2) + w, gl.expand_dims(n_ok, 2) & (w < KW)


@gluon.jit
def _row4_fetch_sz(s_ptr, z_ptr, rows64, n_ok, cstart, k0, G, GROUP: gl.constexpr, MASKED: gl.constexpr):
    """The scale and zero of each thread run of the tile at K column k0 [BLOCK_N, CW], as loaded."""
    g = (k0 + cstart) // GROUP  # [1, CW]
    sz = rows64 * G + g  # [BLOCK_N, CW]
    if MASKED:
        g_ok = n_ok & (g < G)
        return gl.load(s_ptr + sz, mask=g_ok, other=0.0), gl.load(z_ptr + sz, mask=g_ok, other=0)
    else:
        return gl.load(s_ptr + sz), gl.load(z_ptr + sz)


@gluon.jit
def _row4_fetch_x(xw_ptr, wcol, k0, KW, MASKED: gl.constexpr):
    """x at the tile's codes as loaded: four tensors [1, CW, WPT] of int32, pair j of each word being
    x[8 w + 2 j] (low half) and x[8 w + 2 j + 1] (high half)."""
    p = xw_ptr + (k0 // 8 + wcol) * 4
    if MASKED:
        ok = k0 // 8 + wcol < KW
        return (
            gl.load(p, mask=ok, other=0),
            gl.load(p + 1, mask=ok, other=0),
            gl.load(p + 2, mask=ok, other=0),
            gl.load(p + 3, mask=ok, other=0),
        )
    else:
        return gl.load(p), gl.load(p + 1), gl.load(p + 2), gl.load(p + 3)


@gluon.jit
def _row4_widen(p, X_BF16: gl.constexpr):
    """One int32 pair of 16-bit x values -> (low, high) in float32."""
    if X_BF16:  # a bf16 is the top half of its float32
        return (p << 16).to(gl.float32, bitcast=True), (p & -65536).to(gl.float32, bitcast=True)
    else:
        lo = (p & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        hi = (p >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        return lo, hi


@gluon.jit
def _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16: gl.constexpr, CHAINS: gl.constexpr):
    """acc += s * sum over each word's 8 codes of (q - z) * x; CHAINS 0: products in fp16 pairs summed
    over each thread run, acc [BLOCK_N, CW] (else [BLOCK_N, CW, WPT])."""
    if CHAINS == 0:
        xa, xb, xc, xd = gl.inline_asm_elementwise(
            _X_PAIRS_BF16_ASM if X_BF16 else _X_PAIRS_F16_ASM, "=r,=r,=r,=r,r,r,r,r", [p0, p1, p2, p3],
            dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1,
        )  # fmt: skip
        lanes = gl.reduce(_word_dot16(words, gl.expand_dims(z, 2), xa, xb, xc, xd), 2, _hadd2)
        acc = acc + _hsum_f32(lanes) * (s.to(gl.float32) * 16.0)  # acc [BLOCK_N, CW]
    else:
        x0, x1 = _row4_widen(p0, X_BF16)
        x2, x3 = _row4_widen(p1, X_BF16)
        x4, x5 = _row4_widen(p2, X_BF16)
        x6, x7 = _row4_widen(p3, X_BF16)
        part = _word_dot(words, gl.expand_dims(z, 2), x0, x1, x2, x3, x4, x5, x6, x7, CHAINS)
        acc = acc + part * gl.expand_dims(s.to(gl.float32), 2)
    return acc


@gluon.jit
def _pdl_wait(USE_PDL: gl.constexpr):
    """Under PDL: wait for the previous kernel's writes, and let the next kernel launch."""
    if USE_PDL:
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )


@gluon.jit
def _add_norm_epilogue(
    y, offs_n, N, res_ptr, nw_ptr, out_ptr, cnt_ptr, eps, NORM_BLOCK: gl.constexpr, NUM_WARPS: gl.constexpr
):  # fmt: skip
    """gemv.add_norm_epilogue in Gluon: residual[offs_n] += y, then the launch's last program writes
    rmsnorm(residual) * w into out (gemv.AddNorm; the same rounding)."""
    dtype: gl.constexpr = res_ptr.dtype.element_ty
    n_ok = offs_n < N
    r = gl.load(res_ptr + offs_n, mask=n_ok, other=0.0)
    gl.store(res_ptr + offs_n, (y.to(dtype).to(gl.float32) + r.to(gl.float32)).to(dtype), mask=n_ok)
    gl.thread_barrier()  # every thread's stores come before the ticket
    ticket = gl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == gl.num_programs(0) - 1:
        L1: gl.constexpr = gl.BlockedLayout([8], [32], [NUM_WARPS], [0])
        cols = gl.arange(0, NORM_BLOCK, layout=L1)
        ok = cols < N
        x = gl.load(res_ptr + cols, mask=ok, other=0.0, cache_modifier=".cg").to(gl.float32)
        w = gl.load(nw_ptr + cols, mask=ok, other=0.0).to(gl.float32)
        var = gl.sum(x * x, axis=0) / N
        normed = (x * gl.rsqrt(var + eps)).to(dtype).to(gl.float32)
        gl.store(out_ptr + cols, (normed * w).to(dtype), mask=ok)
        gl.store(cnt_ptr, 0)


@gluon.jit
def _silu_mul_epilogue(y, pid, out_ptr, n_inter, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr):
    """gemv.silu_mul_epilogue in Gluon: y [BLOCK_N] (gate and up of a channel side by side) ->
    silu(gate) * up for the program's BLOCK_N / 2 channels (the same rounding)."""
    dtype: gl.constexpr = out_ptr.dtype.element_ty
    # a channel's gate and up in one thread: a plain layout of pairs, then the reshape keeps each
    # thread's two values (element j -> (j // 2, j % 2)) and split takes them apart
    flat: gl.constexpr = gl.BlockedLayout([2], [32], [NUM_WARPS], [0])
    pairs: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [NUM_WARPS, 1], [1, 0])
    g, u = gl.split(gl.convert_layout(gl.reshape(gl.convert_layout(y, flat), [BLOCK_N // 2, 2]), pairs))
    g = g.to(dtype).to(gl.float32)
    act = (g / (1.0 + gl.exp(-g))).to(dtype).to(gl.float32)
    offs = pid * (BLOCK_N // 2) + gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, pairs))
    gl.store(out_ptr + offs, (act * u.to(dtype).to(gl.float32)).to(dtype), mask=offs < n_inter)


@gluon.jit
def _row4_rows_f32(
    xw_ptr, qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, K, KW, G, stride_w,
    GROUP: gl.constexpr, MASKED: gl.constexpr, X_BF16: gl.constexpr, BLOCK_N: gl.constexpr,
    CW: gl.constexpr, WPT: gl.constexpr, L3: gl.constexpr,
):  # fmt: skip
    """The program's rows again with float32 products (one chain per word), one tile at a time: the
    fallback where the fp16 products overflowed (GUARD)."""
    BLOCK_K: gl.constexpr = CW * WPT * 8
    acc = gl.zeros([BLOCK_N, CW, WPT], gl.float32, L3)
    for k0 in range(0, K, BLOCK_K):
        words, s, z = _row4_fetch_w(
            qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, k0, KW, G, stride_w, GROUP, MASKED
        )
        p0, p1, p2, p3 = _row4_fetch_x(xw_ptr, wcol, k0, KW, MASKED)
        acc = _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16, 1)
    return gl.sum(gl.sum(acc, axis=2), axis=1)


@gluon.jit
def _gptq_row4_kernel(
    xw_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, cnt_ptr,
    N, K, KW, G, stride_w, eps,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, MASKED: gl.constexpr, X_BF16: gl.constexpr,
    ROWS: gl.constexpr, WPT: gl.constexpr, WARPS_N: gl.constexpr, WARPS_K: gl.constexpr,
    CHAINS: gl.constexpr, DEPTH: gl.constexpr, USE_PDL: gl.constexpr,
    ADD_NORM: gl.constexpr, NORM_BLOCK: gl.constexpr, SILU_MUL: gl.constexpr, GUARD: gl.constexpr,
):  # fmt: skip
    """One row of x against 4-bit codes in contiguous groups (see the module docstring)."""
    BLOCK_N: gl.constexpr = ROWS * WARPS_N
    CW: gl.constexpr = 32 * WARPS_K  # runs of WPT words across the tile
    BLOCK_K: gl.constexpr = CW * WPT * 8
    L3: gl.constexpr = gl.BlockedLayout([ROWS, 1, WPT], [1, 32, 1], [WARPS_N, WARPS_K, 1], [2, 1, 0])
    L2: gl.constexpr = gl.SliceLayout(2, L3)  # [BLOCK_N, CW]: scales and zeros
    j = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L2))
    if SILU_MUL:  # [gate; up] rows, a program's gate and up rows of the same channels side by side
        ch = gl.program_id(0) * (BLOCK_N // 2) + j // 2
        offs_n = (j % 2) * (N // 2) + ch
        rows_ok = ch < N // 2
    else:
        offs_n = gl.program_id(0) * BLOCK_N + j
        rows_ok = offs_n < N
    rows64 = gl.expand_dims(offs_n, 1).to(gl.int64)  # [BLOCK_N, 1]
    n_ok = gl.expand_dims(rows_ok, 1)
    cstart = gl.expand_dims(gl.arange(0, CW, layout=gl.SliceLayout(0, L2)), 0) * (WPT * 8)  # [1, CW]
    wi = gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    wcol = gl.expand_dims(cstart // 8, 2) + gl.expand_dims(gl.expand_dims(wi, 0), 1)  # [1, CW, WPT]
    if CHAINS == 0:
        acc = gl.zeros([BLOCK_N, CW], gl.float32, L2)
    else:
        acc = gl.zeros([BLOCK_N, CW, WPT], gl.float32, L3)
    # everything of the next DEPTH tiles (weights, scales, zeros, x) is in flight in registers
    # while one tile is computed; the first DEPTH tiles' weights do not depend on the previous
    # kernel and are loaded before the PDL wait, their x after
    words, s, z = _row4_fetch_w(
        qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, 0, KW, G, stride_w, GROUP, MASKED
    )
    if DEPTH == 2:
        w1, s1, z1 = _row4_fetch_w(
            qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, BLOCK_K, KW, G, stride_w, GROUP, MASKED
        )
    _pdl_wait(USE_PDL)
    p0, p1, p2, p3 = _row4_fetch_x(xw_ptr, wcol, 0, KW, MASKED)
    if DEPTH == 2:  # the caller guarantees at least two tiles
        q0, q1, q2, q3 = _row4_fetch_x(xw_ptr, wcol, BLOCK_K, KW, MASKED)
        for k0 in range(2 * BLOCK_K, K, BLOCK_K):
            nw, ns, nz = _row4_fetch_w(
                qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, k0, KW, G, stride_w, GROUP, MASKED
            )
            n0, n1, n2, n3 = _row4_fetch_x(xw_ptr, wcol, k0, KW, MASKED)
            acc = _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16, CHAINS)
            words, s, z, p0, p1, p2, p3 = w1, s1, z1, q0, q1, q2, q3
            w1, s1, z1, q0, q1, q2, q3 = nw, ns, nz, n0, n1, n2, n3
        acc = _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16, CHAINS)
        acc = _row4_step(acc, w1, s1, z1, q0, q1, q2, q3, X_BF16, CHAINS)
    else:
        for k0 in range(BLOCK_K, K, BLOCK_K):
            nw, ns, nz = _row4_fetch_w(
                qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, k0, KW, G, stride_w, GROUP, MASKED
            )
            n0, n1, n2, n3 = _row4_fetch_x(xw_ptr, wcol, k0, KW, MASKED)
            acc = _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16, CHAINS)
            words, s, z, p0, p1, p2, p3 = nw, ns, nz, n0, n1, n2, n3
        acc = _row4_step(acc, words, s, z, p0, p1, p2, p3, X_BF16, CHAINS)
    if CHAINS == 0:
        y = gl.sum(acc, axis=1)
        if GUARD:
            # fp16 products overflow where |x| passes ~17,000 / WPT over a run (or 65,504 alone):
            # a row that came out inf or NaN sends the program through its rows again in float32
            bad = gl.max(gl.where(gl.abs(y) < float("inf"), 0, 1), axis=0)
            if bad != 0:
                y = _row4_rows_f32(
                    xw_ptr, qw_ptr, s_ptr, z_ptr, rows64, n_ok, wcol, cstart, K, KW, G, stride_w,
                    GROUP, MASKED, X_BF16, BLOCK_N, CW, WPT, L3,
                )  # fmt: skip
    else:
        y = gl.sum(gl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += gl.load(b_ptr + offs_n, mask=rows_ok, other=0.0).to(gl.float32)
    if SILU_MUL:
        _silu_mul_epilogue(y, gl.program_id(0), y_ptr, N // 2, BLOCK_N, WARPS_N * WARPS_K)
    elif ADD_NORM:
        _add_norm_epilogue(y, offs_n, N, res_ptr, nw_ptr, y_ptr, cnt_ptr, eps, NORM_BLOCK, WARPS_N * WARPS_K)
    else:
        x_dtype: gl.constexpr = gl.bfloat16 if X_BF16 else gl.float16
        gl.store(y_ptr + offs_n, y.to(x_dtype).to(y_ptr.dtype.element_ty), mask=rows_ok)  # as gemv.py


def gptq_row4(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    group_k: int,
    bias: torch.Tensor | None = None,
    *,
    use_pdl: bool | None = None,
    config: tuple[int, int, int, int, int, int] | None = None,
    add_norm: AddNorm | None = None,
    silu_mul: bool = False,
    out_dtype: torch.dtype | None = None,
    overflow_guard: bool = True,
    input_bound: float | None = None,
) -> torch.Tensor:
    """y [1, N] = x [1, K] . W^T (+ bias) in x's dtype, for 4-bit codes in contiguous groups of
    `group_k` (a multiple of 8); the layout is kernels/gptq_gemm.py's. PDL as the engine set it
    (kernels/pdl.py) unless `use_pdl` says otherwise. With `add_norm` y goes into the residual and
    the launch returns the normalized residual (gemv.AddNorm). With `silu_mul` the rows are a
    merged [gate; up] matrix of 2 I rows and the launch returns silu(gate) * up [1, I] (as gemv's);
    `out_dtype` float32 as gemv's. Launches with fp16 products (the defaults) check their rows and
    redo a program's rows in float32 where one came out inf or NaN (`overflow_guard`; off only to
    test that the check is what keeps such inputs finite), unless `input_bound` (the largest |x|
    the input can hold: Linear.input_bound) proves the fp16 sums finite (fp16_products_hold)."""
    n, g = scales_t.shape
    k = x.shape[1]
    assert x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16), "one row of 16-bit activations"
    assert group_k % 8 == 0 and k % 8 == 0, f"groups of whole packed words (group_k {group_k}, K {k})"
    rows, wpt, warps_n, warps_k, chains, depth = config or default_config(n)
    wpt = max(w for w in (wpt, 2, 1) if w <= wpt and group_k % (8 * w) == 0)
    block_n, block_k = rows * warps_n, 32 * warps_k * wpt * 8
    assert chains in (0, 1, 2) and depth in (1, 2), f"launch {config}: chains 0-2, depth 1-2"
    depth = min(depth, triton.cdiv(k, block_k))  # tiles in flight, at most the row's tiles
    use_pdl = pdl.enabled() if use_pdl is None else use_pdl
    if silu_mul:
        assert n % 2 == 0 and add_norm is None and block_n % 2 == 0, "silu_mul: [gate; up] rows"
    y = torch.empty((1, n // 2 if silu_mul else n), dtype=out_dtype or x.dtype, device=x.device)
    an, norm_block = epilogue_args(add_norm, y)
    xr = x[0]
    if xr.storage_offset() % 2:  # x is read as pairs of 16-bit values: one 32-bit load each
        xr = xr.clone()
    _gptq_row4_kernel[(triton.cdiv(n, block_n),)](
        xr.view(torch.int32), qweight_t, scales_t, zeros_t, bias if bias is not None else scales_t, y,
        an.residual, an.weight, an.counter,
        n, k, k // 8, g, qweight_t.stride(0), an.eps,
        GROUP=group_k, HAS_BIAS=bias is not None, MASKED=bool(n % block_n or k % block_k),
        X_BF16=x.dtype == torch.bfloat16,
        ROWS=rows, WPT=wpt, WARPS_N=warps_n, WARPS_K=warps_k, CHAINS=chains, DEPTH=depth, USE_PDL=use_pdl,
        ADD_NORM=add_norm is not None, NORM_BLOCK=norm_block, SILU_MUL=silu_mul,
        GUARD=overflow_guard and not fp16_products_hold(input_bound, wpt),
        num_warps=warps_n * warps_k, launch_pdl=use_pdl,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y
