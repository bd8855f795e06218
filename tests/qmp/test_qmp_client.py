"""trimig's trio QMP client against the server (fake engine)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from qmp_helpers import FakeEngine

from trimig.errors import TransportError
from trimig.qmp.client import connect_unix
from trimig.qmp.commands import version_info
from trimig.qmp.protocol import QmpError
from trimig.qmp.server import QmpServer


async def test_execute_and_errors(qmp_path: str, engine: FakeEngine) -> None:
    async with connect_unix(qmp_path) as qmp:
        assert qmp.greeting.version == version_info()
        assert await qmp.execute("query-status") == {"running": True, "status": "running"}
        await qmp.execute("migrate-set-parameters", {"downtime-limit": 10})
        assert engine.parameters["downtime-limit"] == 10
        with pytest.raises(QmpError) as info:
            await qmp.execute("nope")
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(QmpError, match="Either 'uri' or 'channels'"):
            await qmp.execute("migrate", {})


async def test_concurrent_executes_get_their_own_replies(qmp_path: str) -> None:
    results: dict[int, tuple[str, Any]] = {}
    async with connect_unix(qmp_path) as qmp:

        async def run(n: int) -> None:
            command = "query-status" if n % 2 else "query-migrate-parameters"
            results[n] = (command, await qmp.execute(command))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(run, n)
    for n, (command, result) in results.items():
        assert ("running" in result) == (command == "query-status"), n


async def test_events_iterator(qmp_path: str, engine: FakeEngine) -> None:
    async with connect_unix(qmp_path) as qmp, qmp.events() as events:
        await qmp.execute("stop")
        await qmp.execute("cont")
        first, second = await events.__anext__(), await events.__anext__()
        assert (first.name, second.name) == ("STOP", "RESUME")
        assert first.timestamp > 1_600_000_000


async def test_connection_loss_fails_pending_commands(qmp_path: str, engine: FakeEngine) -> None:
    engine.migrate_gate = trio.Event()
    async with connect_unix(qmp_path) as qmp:
        events = qmp.events()

        async def kill_connection() -> None:
            await engine.migrate_entered.wait()
            await qmp._connection.stream.aclose()  # as if the engine died

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_connection)
            with pytest.raises(TransportError):
                await qmp.execute("migrate", {"uri": "tcp:h:1"})
        assert [event async for event in events] == []  # the iterator ends
        with pytest.raises(TransportError, match="closed"):
            await qmp.execute("query-status")


async def test_connect_to_missing_socket(socket_dir: str) -> None:
    with pytest.raises(TransportError, match="cannot connect to QMP socket"):
        async with connect_unix(os.path.join(socket_dir, "absent")):
            pass


async def test_connect_waits_for_a_starting_server(socket_dir: str, nursery: trio.Nursery) -> None:
    path = os.path.join(socket_dir, "later.sock")

    async def start_later() -> None:
        await trio.sleep(0.2)
        await nursery.start(QmpServer(FakeEngine()).serve_unix, path)

    nursery.start_soon(start_later)
    async with connect_unix(path, retry_for=5) as qmp:
        assert (await qmp.execute("query-status"))["running"] is True
