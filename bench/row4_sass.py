"""Instructions per 4-bit code in the K loop of kernels/gptq_row4.py, offline (no GPU needed).

Compiles the Gluon kernel for sm_90 with Triton's bundled ptxas, disassembles it with nvdisasm and
counts the SASS instructions of the loop body (the backward branch's range) per code a thread
handles in one tile. Each launch is (rows, words per run, warps along N, warps along K, chains,
depth), as in gptq_row4.default_config:

    python bench/row4_sass.py 4,2,4,2,1,1 4,2,4,2,0,2 [--fp16-x]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from inferfleet.worker import kernels
from inferfleet.worker.kernels import gptq_row4
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

SIG = {
    "xw_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*bf16",
    "res_ptr": "*bf16", "nw_ptr": "*bf16", "cnt_ptr": "*i32",
    "N": "i32", "K": "i32", "KW": "i32", "G": "i32", "stride_w": "i32", "eps": "fp32",
}  # fmt: skip
_ADDR = re.compile(r"\s+/\*([0-9a-f]{4})\*/")


def loop_body(sass: str) -> list[str]:
    """The instructions from a backward branch's target label to the branch (the K loop)."""
    labels: dict[str, int] = {}
    pending = None
    ins = []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L\w+):", line)
        if label:
            pending = label.group(1)
        elif _ADDR.match(line):
            if pending:
                labels[pending], pending = int(_ADDR.match(line).group(1), 16), None
            ins.append(line)
    for line in ins:
        target = re.search(r"BRA\s+`\(([.\w]+)\)", line)
        here = int(_ADDR.match(line).group(1), 16)
        if target and labels.get(target.group(1), here + 1) < here:
            lo = labels[target.group(1)]
            return [x for x in ins if lo <= int(_ADDR.match(x).group(1), 16) <= here]
    raise ValueError("no backward branch: the loop was unrolled away")


def sass(kernel: triton.compiler.CompiledKernel) -> str:
    """The SASS of a kernel compiled for sm_90, from Triton's bundled nvdisasm."""
    nvdisasm = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def opcodes(body: list[str]) -> Counter:
    """Instructions of a SASS excerpt by opcode (modifiers and predicates dropped)."""
    return Counter(
        re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", x).split()[0].split(".")[0] for x in body
    )


def count(launch: tuple[int, ...], x_bf16: bool = True) -> tuple[float, Counter]:
    rows, wpt, warps_n, warps_k, chains, depth = launch
    consts = {
        "GROUP": 128, "HAS_BIAS": False, "MASKED": False, "X_BF16": x_bf16, "ROWS": rows, "WPT": wpt,
        "WARPS_N": warps_n, "WARPS_K": warps_k, "CHAINS": chains, "DEPTH": depth, "USE_PDL": True,
        "ADD_NORM": False, "NORM_BLOCK": 1, "SILU_MUL": False, "GUARD": True,
    }  # fmt: skip
    sig = dict(SIG, **{k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13)}
    src = GluonASTSource(gptq_row4._gptq_row4_kernel, sig, consts, attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps_n * warps_k, **kernels.LAUNCH_OPTIONS},
    )
    body = loop_body(sass(kernel))
    codes_per_thread = rows * wpt * 8
    return len(body) / codes_per_thread, opcodes(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("launches", nargs="+", help="rows,wpt,warps_n,warps_k,chains,depth")
    ap.add_argument("--fp16-x", action="store_true", help="fp16 activations instead of bf16")
    args = ap.parse_args()
    for text in args.launches:
        launch = tuple(int(v) for v in text.split(","))
        per_code, ops = count(launch, x_bf16=not args.fp16_x)
        print(f"{text:>14}: {per_code:.2f} instructions per code; {dict(ops.most_common(8))}")


if __name__ == "__main__":
    main()
