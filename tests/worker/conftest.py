"""Fixtures for the server tests: one in-process server per module where the tests can share it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import ServerThread


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerThread]:
    with ServerThread(tiny_llama) as s:
        yield s
