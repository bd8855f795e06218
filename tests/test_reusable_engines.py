"""Reusable engines: two ``trimig run`` engines pass one adversarial guest back and forth
over QMP (qemu.qmp). A destination whose migration completed migrates its guest on; an
engine whose guest left receives it again; every arrival verifies every page; a wrong
command names the state the engine is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from typing import Any

from adversarial_harness import _connect, _Engine, guest_command
from qemu.qmp import QMPClient

DEADLINE = 120.0


async def _wait(client: QMPClient, wanted: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") == wanted:
            return dict(info)
        assert info.get("status") not in ("failed", "cancelled"), info
        assert time.monotonic() < deadline, f"still {info.get('status')}, wanted {wanted}"
        await asyncio.sleep(0.02)


async def _move(source: QMPClient, destination: QMPClient, postcopy: bool) -> dict[str, Any]:
    """One migration source -> destination (listening on tcp port 0); the verdict there."""
    caps = [{"capability": "postcopy-ram", "state": postcopy}]
    for client in (source, destination):
        await client.execute("migrate-set-capabilities", {"capabilities": caps})
    await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await destination.execute("query-migrate"))["socket-address"][0]["port"]
    await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    if postcopy:
        with contextlib.suppress(Exception):  # it may have completed already
            await source.execute("migrate-start-postcopy")
    await _wait(source, "completed")
    await _wait(destination, "completed")
    assert (await source.execute("query-status"))["status"] == "postmigrate"
    assert (await destination.execute("query-status"))["status"] == "running"
    await asyncio.sleep(0.2)  # the moved guest writes on there
    return dict(await destination.execute("x-guest-verify"))


async def _expect_error(client: QMPClient, command: str, args: dict[str, Any], text: str) -> None:
    try:
        await client.execute(command, args)
    except Exception as exc:
        assert text in str(exc), exc
    else:
        raise AssertionError(f"{command} {args} succeeded")


async def _session(directory: str) -> None:
    deadline = time.monotonic() + DEADLINE
    guest = guest_command(7, 500.0)
    layout = ["--ram", "64M", "--huge", "0"]
    first = _Engine(directory, "a", layout, guest)
    second = _Engine(directory, "b", [*layout, "--incoming", "defer"], guest)
    clients: list[QMPClient] = []
    try:
        a = await _connect(first, deadline)
        b = await _connect(second, deadline)
        clients += [a, b]
        # a has the guest: it cannot receive one.
        await _expect_error(
            a, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "the engine is running"
        )
        verdict = await _move(a, b, postcopy=False)
        assert verdict["verified"], verdict
        # b received: it refuses a second guest, naming its state; a's guest left.
        await _expect_error(
            b,
            "migrate-incoming",
            {"uri": "tcp:127.0.0.1:0"},
            "needs an engine without a guest (started with --incoming defer, or whose guest "
            "migrated away); the engine is running, migration completed",
        )
        await _expect_error(a, "migrate", {"uri": "tcp:127.0.0.1:1"}, "migrated away")
        # b migrates its guest on, back to a (postcopy this time), and a sends it again.
        verdict = await _move(b, a, postcopy=True)
        assert verdict["verified"], verdict
        verdict = await _move(a, b, postcopy=False)
        assert verdict["verified"], verdict
        for client in clients:
            await client.execute("quit")
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
        for engine in (first, second):
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.process.wait(15)
            engine.kill()


def test_a_guest_goes_back_and_forth_between_two_engines() -> None:
    with tempfile.TemporaryDirectory(prefix="tmreuse") as directory:
        asyncio.run(_session(directory))
