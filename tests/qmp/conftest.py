"""Fixtures for the QMP tests (helpers live in qmp_helpers.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import trio
from qmp_helpers import FakeEngine, ThreadedServer

from trimig.qmp.server import QmpServer


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short paths: sun_path is limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="qmp") as directory:
        yield directory


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def qmp_path(engine: FakeEngine, socket_dir: str, nursery: trio.Nursery) -> str:
    """A QmpServer for ``engine`` listening in this test's trio run."""
    path = os.path.join(socket_dir, "qmp.sock")
    await nursery.start(QmpServer(engine).serve_unix, path)
    return path


@pytest.fixture
def threaded_server(socket_dir: str) -> Iterator[ThreadedServer]:
    server = ThreadedServer(os.path.join(socket_dir, "qmp.sock"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
