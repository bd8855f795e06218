"""Real engines driven by QEMU's own qemu.qmp client (asyncio): a whole precopy and a whole
postcopy migration between two ``trimig run`` engines (tests/qmp/engine_processes.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from engine_processes import (
    EVENTS_ON,
    EXIT_TIMEOUT,
    MIGRATION_TIMEOUT,
    START_TIMEOUT,
    EngineProcess,
    StartEngine,
    assert_clean_exit,
    parse_bitmaps,
    tcp_uri,
)
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qmp_helpers import listening

# --- qemu.qmp (asyncio) drives a whole migration -------------------------------------------


async def _qemu_execute(client: QMPClient, command: str, arguments: Any = None) -> Any:
    """qemu.qmp's execute, typed for the checks below."""
    return await client.execute(command, arguments)


@contextlib.asynccontextmanager
async def _qemu_clients(*engines: EngineProcess) -> AsyncIterator[list[QMPClient]]:
    """qemu.qmp clients connected to ``engines``; disconnected on exit, even on failure."""
    clients: list[QMPClient] = []
    try:
        for engine in engines:
            clients.append(await _qemu_connect(engine))
        yield clients
    finally:
        for client in clients:
            with contextlib.suppress(Exception):  # EOFError after quit, as with QEMU
                await client.disconnect()


async def _qemu_connect(engine: EngineProcess) -> QMPClient:
    async with asyncio.timeout(START_TIMEOUT):
        while not listening(engine.path):  # (qemu.qmp logs every failed attempt as an error)
            if engine.process.poll() is not None:
                raise AssertionError(f"{engine.name} exited: {engine.stderr()}")
            await asyncio.sleep(0.05)
        client = QMPClient(engine.name)
        await client.connect(engine.path)
        return client


async def _events_until(
    listener: EventListener,
    final: str,
    *,
    event_name: str = "MIGRATION",
    timeout: float = MIGRATION_TIMEOUT,
) -> list[dict[str, Any]]:
    """Events until (and including) MIGRATION with status ``final`` (or failed); with another
    ``event_name``, until that event."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await listener.get()
            name = str(event["event"])
            data: Any = event.get("data", {})
            received.append({"event": name, "data": data})
            if name == "MIGRATION" and data["status"] == "failed":
                return received
            if name == event_name and (name != "MIGRATION" or data["status"] == final):
                return received


def _statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


async def _quit_qemu(client: QMPClient, engine: EngineProcess) -> None:
    guests = engine.children()
    await _qemu_execute(client, "quit")
    # The server closes the stream after quit; qemu.qmp reports that EOF here, as with QEMU
    # (qemu.machine ignores it once it has issued quit).
    with contextlib.suppress(EOFError):
        await client.disconnect()
    await asyncio.to_thread(engine.process.wait, EXIT_TIMEOUT)
    assert_clean_exit(engine, guests)


def test_qemu_qmp_migrates_between_two_engines(start_engine: StartEngine) -> None:
    source = start_engine("src")
    destination = start_engine("dst", "--incoming", "defer")

    async def session() -> None:
        async with _qemu_clients(source, destination) as (src, dst):
            assert await _qemu_execute(dst, "query-status") == {
                "running": False,
                "singlestep": False,
                "status": "inmigrate",
            }
            assert (await _qemu_execute(src, "query-status"))["status"] == "running"
            for client in (src, dst):
                await _qemu_execute(client, "migrate-set-capabilities", EVENTS_ON)
            src_events, dst_events = EventListener(), EventListener()
            src.register_listener(src_events)
            dst.register_listener(dst_events)

            # Port 0: the destination says where it really listens, as QEMU does.
            channel = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "0"}
            await _qemu_execute(
                dst,
                "migrate-incoming",
                {"channels": [{"channel-type": "main", "addr": channel}], "exit-on-error": False},
            )
            uri = tcp_uri(await _qemu_execute(dst, "query-migrate"))

            await _qemu_execute(src, "migrate", {"uri": uri})
            source_events = await _events_until(src_events, "completed")
            destination_events = await _events_until(dst_events, "completed")

            assert _statuses(source_events) == ["setup", "active", "device", "completed"]
            passes = [e["data"]["pass"] for e in source_events if e["event"] == "MIGRATION_PASS"]
            assert passes and passes == list(range(1, len(passes) + 1))
            assert {"event": "STOP", "data": {}} in source_events
            assert _statuses(destination_events) == ["setup", "active", "completed"]
            assert {"event": "RESUME", "data": {}} in destination_events

            info = await _qemu_execute(src, "query-migrate")
            assert info["status"] == "completed"
            ram = info["ram"]
            assert ram["total"] == 64 << 20 and ram["remaining"] == 0
            assert ram["transferred"] >= ram["total"]
            assert ram["normal"] + ram["duplicate"] >= ram["total"] // ram["page-size"]
            assert ram["dirty-sync-count"] == len(passes) + 1  # the last sync is under downtime
            assert info["total-time"] >= info["setup-time"] >= 0 and info["downtime"] >= 0
            assert "expected-downtime" not in info
            destination_info = await _qemu_execute(dst, "query-migrate")
            assert destination_info["status"] == "completed"
            assert tcp_uri(destination_info) == uri

            assert await _qemu_execute(src, "query-status") == {
                "running": False,
                "singlestep": False,
                "status": "postmigrate",
            }
            assert await _qemu_execute(dst, "query-status") == {
                "running": True,
                "singlestep": False,
                "status": "running",
            }
            await _quit_qemu(src, source)
            await _quit_qemu(dst, destination)

    asyncio.run(asyncio.wait_for(session(), 90))


def test_qemu_qmp_postcopy_between_two_engines(start_engine: StartEngine) -> None:
    source = start_engine("src")
    destination = start_engine("dst", "--incoming", "defer")

    async def session() -> None:
        async with _qemu_clients(source, destination) as (src, dst):
            capabilities = {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "postcopy-ram", "state": True},
                ]
            }
            for client in (src, dst):
                await _qemu_execute(client, "migrate-set-capabilities", capabilities)
            # Slow enough that the switch comes in the middle of precopy and postcopy lasts a while.
            await _qemu_execute(
                src,
                "migrate-set-parameters",
                {"max-bandwidth": 64 << 20, "max-postcopy-bandwidth": 32 << 20},
            )
            src_events, dst_events = EventListener(), EventListener()
            src.register_listener(src_events)
            dst.register_listener(dst_events)
            await _qemu_execute(dst, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            uri = tcp_uri(await _qemu_execute(dst, "query-migrate"))
            await _qemu_execute(src, "migrate", {"uri": uri})
            async with asyncio.timeout(MIGRATION_TIMEOUT):
                while (await _qemu_execute(src, "query-migrate"))["status"] != "active":
                    await asyncio.sleep(0.01)
            await _qemu_execute(src, "migrate-start-postcopy")
            # Once the destination confirms the package (PONG 0x42) the source is postcopy-active
            # and there is no way back.
            source_events = await _events_until(src_events, "postcopy-active")
            with pytest.raises(ExecuteError) as refused:
                await _qemu_execute(src, "migrate_cancel")
            assert "postcopy" in str(refused.value)
            assert (await _qemu_execute(src, "query-status"))["running"] is False
            # The destination's guest runs (RESUME) while its pages still arrive.
            destination_events = await _events_until(dst_events, "", event_name="RESUME")
            assert (await _qemu_execute(dst, "query-status"))["status"] == "running"
            source_events += await _events_until(src_events, "completed")
            destination_events += await _events_until(dst_events, "completed")

            assert _statuses(source_events) == [
                "setup", "active", "device", "postcopy-device", "postcopy-active", "completed"
            ]  # fmt: skip
            assert {"event": "STOP", "data": {}} in source_events
            assert _statuses(destination_events) == [
                "setup", "active", "postcopy-device", "postcopy-active", "completed"
            ]  # fmt: skip
            assert {"event": "RESUME", "data": {}} in destination_events
            info = await _qemu_execute(src, "query-migrate")
            assert info["status"] == "completed"
            assert info["ram"]["postcopy-bytes"] > 0 and info["ram"]["remaining"] == 0
            # The debug dumps: every page sent and none dirty here, every page received there.
            sent = parse_bitmaps((await _qemu_execute(src, "x-dump-bitmaps"))["text"])
            received = parse_bitmaps((await _qemu_execute(dst, "x-dump-bitmaps"))["text"])
            blocks = {name for name, _ in received}
            assert blocks and set(sent) == {(b, k) for b in blocks for k in ("dirty", "sent")}
            for block in blocks:
                pages = len(received[block, "received"])
                assert pages > 0 and set(received[block, "received"]) == {"X"}, block
                assert sent[block, "sent"] == "X" * pages and sent[block, "dirty"] == "." * pages
            assert (await _qemu_execute(src, "query-status"))["status"] == "postmigrate"
            assert (await _qemu_execute(dst, "query-status"))["status"] == "running"
            await _quit_qemu(src, source)
            await _quit_qemu(dst, destination)

    asyncio.run(asyncio.wait_for(session(), 90))
