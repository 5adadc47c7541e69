"""Packaging invariants: every source folder is in the wheel, and `operator/` never shadows the
standard library's `operator` module."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_folder_is_a_listed_package() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    for import_name, folder in mapping.items():
        for d in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if d.name == "__pycache__" or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(ROOT / folder).parts
            name = ".".join([import_name, *rel])
            assert name in listed, f"{d} holds Python files but {name} is not in [tool.setuptools] packages"


def test_operator_folder_cannot_shadow_the_stdlib() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists(), "operator/ must stay a namespace portion"
    # the repository root first on sys.path, as `python -m ...` run from it does
    code = "import sys; sys.path.insert(0, ''); import operator; print(operator.__file__)"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "site-packages" not in out.stdout and str(ROOT) not in out.stdout
    assert out.stdout.strip().endswith("operator.py")
