"""The unmodified qemu.qmp QMPClient (asyncio) against our server, which runs in its own thread
with its own trio.run: QEMU's own Python client must connect, negotiate, execute and receive
events exactly as it does with QEMU."""

from __future__ import annotations

import asyncio
import logging

import pytest
import trio
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qmp_helpers import FakeEngine, ThreadedServer


def test_qemu_qmp_client_talks_to_trimig(
    threaded_server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    engine = threaded_server.engine
    assert engine is not None

    async def session() -> None:
        qmp = QMPClient("trimig-interop")
        await asyncio.wait_for(qmp.connect(threaded_server.path), 10)
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.version["package"].startswith("trimig")

            status = await asyncio.wait_for(qmp.execute("query-status"), 5)
            assert status == {"running": True, "status": "running"}

            with pytest.raises(ExecuteError) as info:
                await qmp.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("migrate", {"uri": 7})
            assert info.value.error_class == "GenericError"
            assert "Invalid parameter type for 'uri'" in str(info.value)

            # Several commands in flight at once, each matched to its reply by id.
            results = await asyncio.wait_for(
                asyncio.gather(
                    qmp.execute("query-migrate-parameters"),
                    qmp.execute("query-status"),
                    qmp.execute("query-migrate-capabilities"),
                ),
                5,
            )
            assert "downtime-limit" in results[0] and "running" in results[1]

            listener = EventListener()
            with qmp.listen(listener):
                await qmp.execute("stop")
                stop = await asyncio.wait_for(listener.get(), 5)
                assert stop["event"] == "STOP"
                assert set(stop["timestamp"]) == {"seconds", "microseconds"}
                # An event the engine emits on its own (from the server's trio thread).
                threaded_server.call(engine.emit, "MIGRATION", {"status": "active"})
                migration = await asyncio.wait_for(listener.get(), 5)
                assert migration["event"] == "MIGRATION"
                assert migration["data"] == {"status": "active"}
            assert await qmp.execute("query-status") == {"running": False, "status": "paused"}
        finally:
            await qmp.disconnect()

    with caplog.at_level(logging.WARNING, logger="qemu.qmp"):
        asyncio.run(session())
    # qemu.qmp logs (without raising) replies it cannot route and malformed messages.
    assert not [record for record in caplog.records if record.name.startswith("qemu.qmp")]


def test_qemu_qmp_client_disconnecting_mid_command(threaded_server: ThreadedServer) -> None:
    engine = threaded_server.engine
    assert engine is not None
    gate = threaded_server.call(_install_gate, engine)

    async def abandon() -> None:
        qmp = QMPClient("leaver")
        await qmp.connect(threaded_server.path)
        task = asyncio.ensure_future(qmp.execute("migrate", {"uri": "tcp:h:1"}))
        await asyncio.sleep(0.1)
        await qmp.disconnect()
        with pytest.raises(Exception):  # noqa: B017 (ExecInterruptedError or CancelledError)
            await task

    asyncio.run(abandon())
    threaded_server.call(gate.set)

    async def check() -> None:
        qmp = QMPClient("stayer")
        await qmp.connect(threaded_server.path)
        try:
            for _ in range(100):
                info = await qmp.execute("query-migrate")
                if info.get("status") == "active":
                    break
                await asyncio.sleep(0.02)
            assert info["status"] == "active"  # the abandoned command still completed
        finally:
            await qmp.disconnect()

    asyncio.run(check())


def _install_gate(engine: FakeEngine) -> trio.Event:
    gate = trio.Event()
    engine.migrate_gate = gate
    return gate
