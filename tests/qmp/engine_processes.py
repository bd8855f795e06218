"""Real engines for the tests/qmp/test_engines_*.py tests: ``trimig run`` subprocesses (each
with the built-in guest, 64 MiB of RAM), their bounds, and the checks and waits those tests
share (the ``start_engine`` fixture is in conftest.py).

Every wait is bounded (trio.fail_after / asyncio.timeout), and every engine a test starts is
killed, with its guests, if the test did not shut it down itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from trimig.qmp.client import QmpClient

RAM = "64M"
#: An engine starts its guest (and fills 64 MiB) before its QMP socket appears.
START_TIMEOUT = 30.0
#: A 64 MiB migration takes well under a second here; this bounds a whole one generously.
MIGRATION_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
#: A sink that accepts a whole migration stream (the exec transport, no return path).
SINK_URI = "exec:cat > /dev/null"
#: Bytes/s that keep a 64 MiB migration going for several seconds.
SLOW_BANDWIDTH = 8 << 20

EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}


@attrs.define
class EngineProcess:
    """A ``trimig run`` subprocess; stderr goes to a file (read back for checks)."""

    name: str
    path: str
    process: subprocess.Popen[bytes]
    stderr_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as file:
            return file.read()

    def children(self) -> list[int]:
        """Pids of the engine's child processes (its guest)."""
        pids: list[int] = []
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except FileNotFoundError:
            return pids
        for task in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{task}/children") as file:
                    pids += [int(word) for word in file.read().split()]
            except FileNotFoundError:
                continue
        return pids

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        with trio.fail_after(timeout):
            while (code := self.process.poll()) is None:
                await trio.sleep(0.02)
        return code

    def kill(self) -> None:
        """Last resort (test teardown): SIGKILL the engine and its guests."""
        if self.process.poll() is None:
            for child in self.children():
                _kill_quietly(child)
            self.process.kill()
            self.process.wait(10)


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


StartEngine = Callable[..., EngineProcess]


def assert_clean_exit(engine: EngineProcess, guests: list[int]) -> None:
    """Exit status 0, the guest processes gone, the QMP socket file removed, no traceback."""
    assert engine.process.returncode == 0, engine.stderr()
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in guests) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in guests if _alive(pid)], "guest processes outlived the engine"
    assert not os.path.exists(engine.path), "the QMP socket file was left behind"
    assert "Traceback" not in engine.stderr(), engine.stderr()


def tcp_uri(info: dict[str, Any]) -> str:
    """The URI of a destination's listening address, from its query-migrate."""
    (address,) = info["socket-address"]
    assert address["type"] == "inet"
    assert address["host"] == "127.0.0.1" and int(address["port"]) > 0
    return f"tcp:{address['host']}:{address['port']}"


def parse_bitmaps(text: str) -> dict[tuple[str, str], str]:
    """An x-dump-bitmaps text as {(block, bitmap): one character a page}."""
    bitmaps: dict[tuple[str, str], str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("0x"):
            assert key is not None, text
            bitmaps[key] += line.split(" : ", 1)[1]
        else:
            block, _, kind = line.rstrip(":").rpartition(" ")
            key = (block, kind)
            bitmaps[key] = ""
    return bitmaps


async def wait_status(
    client: QmpClient, wanted: str, timeout: float = MIGRATION_TIMEOUT
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            info: dict[str, Any] = await client.execute("query-migrate")
            if info.get("status") == wanted:
                return info
            assert info.get("status") != "failed", info
            await trio.sleep(0.01)


async def quit_engine(client: QmpClient, engine: EngineProcess) -> None:
    guests = engine.children()
    assert guests, "the engine has no guest process"
    assert await client.execute("quit") == {}
    await engine.wait_exit()
    assert_clean_exit(engine, guests)


async def next_event(events: Any, name: str) -> Any:
    with trio.fail_after(MIGRATION_TIMEOUT):
        async for event in events:
            if event.name == name:
                return event
    raise AssertionError(f"the connection ended before {name}")


async def run_trimig(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(MIGRATION_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "trimig.cli", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result
