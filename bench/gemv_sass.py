"""Instructions per weight byte in the K loop of kernels/gemv.py's one-row path, offline (no GPU).

Compiles `_gemv_kernel` for sm_90 with Triton's bundled ptxas, disassembles it and counts the SASS
of the K loop (bench/row4_sass.py's loop_body) per weight byte a thread handles in one tile, with
the whole-tile loads (EVEN_K, x read in the weights' register layout) and without them (x loaded as
its own [1, BLOCK_K] tile, converted through shared memory). Each launch is
dtype,block_n,block_k,warps,stages,prefetch as in gemv.default_config:

    python bench/gemv_sass.py fp8,8,1024,4,4,2 bf16,8,512,4,4,2
"""

from __future__ import annotations

import argparse

import triton
from inferfleet.worker import kernels
from inferfleet.worker.kernels import gemv
from row4_sass import loop_body, opcodes, sass
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

WEIGHT = {"bf16": ("*bf16", 2), "fp8": ("*fp8e4nv", 1), "int8": ("*i8", 1)}
# the kernel's runtime arguments, in its order; the types of those that are not bf16 pointers or
# int32 sizes and strides (w_ptr: the launch's weight type)
ARGS = [p.name for p in gemv._gemv_kernel.params if not p.is_constexpr]
TYPES = {"s_ptr": "*fp32", "sq_ptr": "*fp32", "cnt_ptr": "*i32", "best_ptr": "*i64", "eps": "fp32"}


def count(dtype: str, block_n: int, block_k: int, warps: int, stages: int, prefetch: int, even_k: bool):
    """(instructions per weight byte in the loop, opcodes, shared-memory bytes) of one launch."""
    wty, wbytes = WEIGHT[dtype]
    consts = {
        "HAS_SCALE": wbytes == 1, "HAS_BIAS": False, "FMA": True, "BLOCK_M": 1, "BLOCK_N": block_n,
        "BLOCK_K": block_k, "USE_PDL": True, "PREFETCH": prefetch, "ADD_NORM": False, "NORM_BLOCK": 1,
        "SILU_MUL": False, "EVEN_K": even_k, "ARGMAX": False, "ADD_INTO": False, "NORM_IN": False,
        "ADD_SQ": False, "RMS_IN": False,
    }  # fmt: skip
    types = {name: TYPES.get(name, "*bf16" if name.endswith("_ptr") else "i32") for name in ARGS}
    sig = types | {"w_ptr": wty} | {k: "constexpr" for k in consts}
    # pointers and the strides / sizes Triton would see as multiples of 16 (the M and eps args aside)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(ARGS) if name not in ("M", "eps")}
    src = ASTSource(gemv._gemv_kernel, sig, consts, attrs)
    # the engine's launch options (FMA contraction on, kernels.LAUNCH_OPTIONS)
    options = {"num_warps": warps, "num_stages": stages, **kernels.LAUNCH_OPTIONS}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    body = loop_body(sass(kernel))
    bytes_per_thread = block_n * block_k * wbytes / (32 * warps)
    return len(body) / bytes_per_thread, opcodes(body), kernel.metadata.shared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("launches", nargs="+", help="dtype,block_n,block_k,warps,stages,prefetch")
    args = ap.parse_args()
    for text in args.launches:
        dtype, *ints = text.split(",")
        for even_k in (False, True):
            per_byte, ops, shared = count(dtype, *(int(v) for v in ints), even_k=even_k)
            loads = "whole tiles (x in the weights' layout)" if even_k else "masked (x its own tile)"
            keep = {
                op: n for op, n in ops.items() if op in ("BAR", "STS", "LDS", "LDG", "FFMA", "HADD2", "F2FP")
            }
            print(
                f"{text:>20} {loads:>40}: {per_byte:.3f} instructions per weight byte, shared {shared} B; {keep}"
            )


if __name__ == "__main__":
    main()
