"""``x-guest-verify`` on real ``trimig run`` engines, driven by QEMU's qemu.qmp client: a
source engine's guest verifies (and keeps running), an engine with no guest refuses it,
naming its state."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time

import pytest
from adversarial_harness import _connect, _Engine, guest_command
from qemu.qmp import ExecuteError


async def _scenario(directory: str) -> None:
    source = _Engine(directory, "src", ["--ram", "16M"], guest_command(5, 500.0))
    destination = _Engine(
        directory, "dst", ["--ram", "16M", "--incoming", "defer"], guest_command(5, 500.0)
    )
    try:
        deadline = time.monotonic() + 60
        s = await _connect(source, deadline)
        d = await _connect(destination, deadline)
        await asyncio.sleep(0.2)  # the guest writes a while
        reply = await s.execute("x-guest-verify")
        assert reply["verified"] is True, reply
        assert "match the journal" in reply["detail"], reply
        status = await s.execute("query-status")
        assert status["running"] is True, status  # resumed after the check
        with pytest.raises(ExecuteError, match="no guest here to verify"):
            await d.execute("x-guest-verify")
        for client in (s, d):
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()
        for engine in (source, destination):
            engine.process.wait(15)
    finally:
        source.kill()
        destination.kill()


def test_x_guest_verify() -> None:
    with tempfile.TemporaryDirectory(prefix="tmver") as directory:
        asyncio.run(_scenario(directory))
