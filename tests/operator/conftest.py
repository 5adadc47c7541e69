"""Fixtures for the operator tests: the API-server emulator on loopback, the operator, fake workers.

Helpers live in ifo_support.py (tests import them by that unique name, never from conftest).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import kmock
import pytest_asyncio
from ifo_emulator import Emulator
from ifo_support import FakeWorker, cluster_role_rules, operator_config, running_operator
from inferfleet.operator import crd


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The API server, on 127.0.0.1 at a random port, enforcing manifests/rbac.yaml on the operator."""
    emu = Emulator(rbac_rules=cluster_role_rules(), simulate_deployments=True)
    async with emu, kmock.Server(emu):
        emu.put("apiextensions.k8s.io/v1/customresourcedefinitions", crd.crd())
        yield emu
    assert not emu.denied, f"the operator needed permissions manifests/rbac.yaml lacks: {emu.denied}"


@pytest_asyncio.fixture
async def operator(emulator: Emulator) -> AsyncIterator[Emulator]:
    async with running_operator(operator_config(emulator)):
        yield emulator


@pytest_asyncio.fixture
async def fake_workers() -> AsyncIterator[Callable[[int], Awaitable[list[FakeWorker]]]]:
    started: list[FakeWorker] = []

    async def start(n: int) -> list[FakeWorker]:
        workers = [await FakeWorker().start() for _ in range(n)]
        started.extend(workers)
        return workers

    yield start
    for w in started:
        await w.stop()
