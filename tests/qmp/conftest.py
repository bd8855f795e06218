"""Fixtures for the QMP tests (helpers live in qmp_helpers.py and engine_processes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trio
from engine_processes import RAM, EngineProcess, StartEngine
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


@pytest.fixture
def start_engine() -> Iterator[StartEngine]:
    """``start_engine(name, *extra_args)``: spawn ``trimig run --qmp unix:DIR/NAME.sock``."""
    engines: list[EngineProcess] = []
    with tempfile.TemporaryDirectory(prefix="tmeng") as directory:

        def start(name: str, *extra: str) -> EngineProcess:
            path = os.path.join(directory, f"{name}.sock")
            stderr_path = os.path.join(directory, f"{name}.stderr")
            with open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "trimig.cli",
                        "run",
                        "--qmp",
                        f"unix:{path}",
                        "--ram",
                        RAM,
                        *extra,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                )
            engine = EngineProcess(name, path, process, stderr_path)
            engines.append(engine)
            return engine

        try:
            yield start
        finally:
            for engine in engines:
                engine.kill()
