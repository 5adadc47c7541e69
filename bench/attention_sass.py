"""Instructions per KV byte in the key loop of kernels/paged_attention.py's decode launch, offline.

Compiles `_paged_attention_kernel` for sm_90 with Triton's bundled ptxas (no GPU needed) as a
decode step of the Llama-3.1-8B shape launches it (GQA 4, head_dim 128, pages of 16, PDL, rotary
not fused), disassembles it and counts the SASS of the key loop (bench/row4_sass.py's loop_body)
per K and V byte a thread handles in one tile, with the registers and shared memory a program
takes (which set how many programs share an SM). Each launch is cache,block_n,warps,stages[,v][,map[Q]]:
cache bf16 or fp8; `v` widens an fp8 cache's V in its load layout (WIDEN_V); `map` compiles the
tile-map launch of MixedGraphs' steps with 16-token tiles (64 MMA rows; the default until the
eighteenth session) instead, `mapQ` one with Q-token tiles (the map_block_q tuning; map4 is
today's default for Llama's G = 4):

    python bench/attention_sass.py bf16,64,4,2 fp8,128,4,3 fp8,128,4,2,v bf16,64,4,3,map bf16,64,4,3,map4

Counts depend on the Triton version. The sixteenth session's (docs/benchmarks.md) are Triton
3.6.0's, the device image's, run from the CPU venv with that wheel unpacked on PYTHONPATH
(`pip download triton==3.6.0 --no-deps`, unzip, chmod +x its backends/nvidia/bin/*); the venv's
own Triton gives the same picture.

Sixteenth session: without WIDEN_V, Triton loads an fp8 V tile from shared memory one byte per
instruction (LDS.U8) to build the dot's operand, since V's layout is transposed for it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from inferfleet.worker import kernels
from inferfleet.worker.kernels import paged_attention as pa
from row4_sass import loop_body, opcodes, sass
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARGS = [p.name for p in pa._paged_attention_kernel.params if not p.is_constexpr]
INT_PTRS = ("qsl_ptr", "seqlen_ptr", "bt_ptr", "tile_ptr", "pos_ptr", "slot_ptr")
FLOATS = ("scale_log2", "k_inv", "v_inv", "v_scale")


def resources(kernel: triton.compiler.CompiledKernel) -> int:
    """Registers per thread, from cuobjdump's resource usage."""
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True)
    return int(re.search(r"REG:(\d+)", usage.stdout).group(1))


def loop(
    cache: str, block_n: int, warps: int, stages: int, widen_v: bool, map_q: int = 0
) -> tuple[list[str], Any]:
    """The key loop's SASS lines and the compiled kernel of one launch; `map_q` > 0: a MixedGraphs
    launch (prefill tiles of map_q tokens over a tile map) instead of a decode launch."""
    kv = "*fp8e4nv" if cache == "fp8" else "*bf16"
    types = {n: ("*i32" if n in INT_PTRS else "*bf16") if n.endswith("_ptr") else "i32" for n in ARGS}
    types |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "kc_ptr": kv, "vc_ptr": kv} | dict.fromkeys(
        FLOATS, "fp32"
    )
    consts = {
        "G": 4, "HEAD_DIM": 128, "PAGE": 16, "BLOCK_Q": map_q or 1, "BLOCK_M": max(16, 4 * (map_q or 1)),
        "BLOCK_N": block_n, "NUM_SPLITS": 1, "PRECISION": "tf32", "Q_F16": cache == "fp8", "HEADS_FAST": True,
        "USE_PDL": True, "FUSE_NEW": False, "CLAMP_FP8": cache == "fp8", "FP8_MAX": 448.0, "TILE_MAP": map_q > 0,
        "WIDEN_V": widen_v,
    }  # fmt: skip
    # pointers, strides and sizes as Triton sees them in the engine: multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(ARGS) if "ptr" in n or "stride" in n}
    src = ASTSource(pa._paged_attention_kernel, types | dict.fromkeys(consts, "constexpr"), consts, attrs)
    options = {"num_warps": warps, "num_stages": stages, **kernels.LAUNCH_OPTIONS}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return loop_body(sass(kernel)), kernel


def count(cache: str, block_n: int, warps: int, stages: int, widen_v: bool, map_q: int = 0):
    """(loop instructions, per KV byte per thread, opcodes, registers, shared bytes) of one launch."""
    body, kernel = loop(cache, block_n, warps, stages, widen_v, map_q)
    kv_bytes = block_n * 128 * 2 * (1 if cache == "fp8" else 2) / (32 * warps)
    return len(body), len(body) / kv_bytes, opcodes(body), resources(kernel), kernel.metadata.shared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("launches", nargs="+", help="cache,block_n,warps,stages[,v][,map[Q]]")
    for text in ap.parse_args().launches:
        cache, block_n, warps, stages, *flags = text.split(",")
        maps = [f for f in flags if f.startswith("map")]
        map_q = (int(maps[0][3:] or 16)) if maps else 0
        n, per_byte, ops, regs, shared = count(
            cache, int(block_n), int(warps), int(stages), "v" in flags, map_q
        )
        keep = {
            op: c for op, c in ops.items() if op in ("LDS", "LDSM", "STS", "F2FP", "HMMA", "IMAD", "LDGSTS")
        }
        print(f"{text:>16}: {n} instructions, {per_byte:.2f} per KV byte per thread, {regs} registers, "
              f"shared {shared} B; {keep}")  # fmt: skip


if __name__ == "__main__":
    main()
