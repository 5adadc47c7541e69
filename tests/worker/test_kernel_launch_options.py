"""Every Triton launch in worker/kernels passes kernels.LAUNCH_OPTIONS, so FMA contraction stays on
whatever Triton's default (3.9 warns that 3.10 turns it off)."""

from __future__ import annotations

import ast
from pathlib import Path

from inferfleet.worker import kernels

KERNELS = Path(kernels.__file__).parent


def _launches(tree: ast.AST) -> list[ast.Call]:
    """Calls of the form `_name_kernel[grid](...)`: the package's kernel launches."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id.endswith("_kernel")
    ]


def _passes_options(call: ast.Call) -> bool:
    return any(
        kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id == "LAUNCH_OPTIONS"
        for kw in call.keywords
    )


def test_fp_fusion_is_requested_explicitly() -> None:
    assert kernels.LAUNCH_OPTIONS == {"enable_fp_fusion": True}


def test_every_kernel_launch_passes_the_launch_options() -> None:
    launches = {
        f"{path.name}:{call.lineno}": _passes_options(call)
        for path in sorted(KERNELS.glob("*.py"))
        for call in _launches(ast.parse(path.read_text()))
    }
    # gemv, paged attention and its merge, the norms, rotary, SiLU, sampling, FP8 and GPTQ kernels
    assert len(launches) >= 14, sorted(launches)
    assert [where for where, ok in launches.items() if not ok] == []
