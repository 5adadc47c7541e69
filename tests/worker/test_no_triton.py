"""A CPU worker without Triton (an optional dependency: Linux x86-64 wheels only) loads and
generates: nothing on the CPU path may import the Triton kernels. The test venv has Triton, so a
fresh interpreter blocks the import first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on an install without it
from inferfleet.worker import LLM, SamplingParams, kernels
assert not kernels.AVAILABLE
llm = LLM(sys.argv[1], device="cpu")
out = llm.generate(["The scheduler admits"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
assert len(out.token_ids) == 6, out
assert "triton" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
print("ok", out.token_ids)
"""


def test_cpu_worker_runs_without_triton(tiny_llama: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
