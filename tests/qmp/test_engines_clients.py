"""Real engines and trimig's trio QMP client: errors in every state keep the socket up,
migrate_cancel resumes the source, several clients and vanishing ones (raw sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from engine_processes import (
    EVENTS_ON,
    EXIT_TIMEOUT,
    SINK_URI,
    SLOW_BANDWIDTH,
    START_TIMEOUT,
    StartEngine,
    assert_clean_exit,
    next_event,
    quit_engine,
    run_trimig,
    wait_status,
)
from qmp_helpers import raw_client

from trimig.qmp.client import QmpClient, connect_unix
from trimig.qmp.protocol import QmpError

# --- errors, several clients, vanishing clients (trimig's trio client) ----------------------


async def _expect_error(client: QmpClient, command: str, arguments: Any, *words: str) -> str:
    with pytest.raises(QmpError) as info:
        await client.execute(command, arguments)
    for word in words:
        assert word in info.value.desc, info.value.desc
    return info.value.error_class


async def test_errors_in_every_state_keep_the_socket_up(start_engine: StartEngine) -> None:
    source = start_engine("src")
    destination = start_engine("dst", "--incoming", "defer")
    async with (
        connect_unix(source.path, retry_for=START_TIMEOUT) as src,
        connect_unix(destination.path, retry_for=START_TIMEOUT) as dst,
    ):
        with trio.fail_after(60):
            # Unknown commands and bad arguments.
            assert await _expect_error(src, "no-such-command", None) == "CommandNotFound"
            await _expect_error(src, "migrate", {"uri": 7}, "Invalid parameter type for 'uri'")
            await _expect_error(src, "migrate", {}, "'uri' or 'channels'")
            await _expect_error(src, "migrate", {"uri": "bogus:1"}, "unknown transport")
            await _expect_error(src, "migrate", {"uri": "tcp:h:1", "x": 1}, "'x' is unexpected")
            await _expect_error(
                src,
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "no-such", "state": True}]},
                "no-such",
            )
            await _expect_error(src, "migrate-set-parameters", {"downtime-limit": -1}, "between")
            # Wrong states with nothing running.
            await _expect_error(src, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "--incoming")
            await _expect_error(src, "migrate-start-postcopy", None, "no outgoing migration")
            await _expect_error(dst, "migrate", {"uri": SINK_URI}, "no guest")
            await _expect_error(dst, "cont", None, "no guest")
            # Postcopy recovery commands name the state they need and the engine's.
            await _expect_error(src, "migrate-pause", None, "needs a running postcopy")
            await _expect_error(src, "migrate", {"uri": SINK_URI, "resume": True}, "migration none")
            await _expect_error(
                dst, "migrate-recover", {"uri": "tcp:127.0.0.1:0"}, "needs a paused incoming"
            )
            await _expect_error(dst, "migrate-recover", {}, "'uri' is missing")
            await _expect_error(dst, "migrate-incoming", {"uri": "tcp:256.0.0.1:0"})
            await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})  # still allowed
            await _expect_error(dst, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "already")

            # Wrong states while migrating (slowly, into a sink).
            await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW_BANDWIDTH})
            await src.execute("migrate", {"uri": SINK_URI})
            await wait_status(src, "active")
            await _expect_error(src, "migrate", {"uri": SINK_URI}, "while a migration is running")
            await _expect_error(src, "migrate-start-postcopy", None, "postcopy-ram")
            await _expect_error(src, "migrate-pause", None, "the outgoing migration is active")
            await _expect_error(
                src,
                "migrate",
                {"uri": SINK_URI, "resume": True},
                "needs a paused postcopy (postcopy-paused); the outgoing migration is active",
            )
            await _expect_error(
                src, "migrate-set-capabilities", EVENTS_ON, "while a migration is running"
            )
            # Faster now: the running migration completes.
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            info = await wait_status(src, "completed")
            assert info["ram"]["remaining"] == 0
            assert await src.execute("query-status") == {
                "running": False,
                "singlestep": False,
                "status": "postmigrate",
            }
            await _expect_error(src, "cont", None, "migrated away")
            await _expect_error(src, "migrate", {"uri": SINK_URI}, "migrated away")
            await _expect_error(src, "migrate-start-postcopy", None, "no outgoing migration")
            assert await src.execute("migrate_cancel") == {}  # nothing to cancel: no error

            # Garbage on the wire is answered and the connection stays usable.
            async with raw_client(source.path) as raw:
                await raw.send_bytes(b'{"execute": ]\n')
                assert "error" in await raw.receive()
                reply = await raw.execute("query-status", id="after-garbage")
                assert reply["id"] == "after-garbage" and reply["return"]["status"] == "postmigrate"

            await quit_engine(src, source)
        # The destination never got a migration: quit it with its listener open.
        with trio.fail_after(EXIT_TIMEOUT):
            assert await dst.execute("quit") == {}
            await destination.wait_exit()
        assert_clean_exit(destination, [])


async def test_migrate_cancel_resumes_the_source(start_engine: StartEngine) -> None:
    source = start_engine("src")
    async with connect_unix(source.path, retry_for=START_TIMEOUT) as src:
        with trio.fail_after(60):
            await src.execute("migrate-set-capabilities", EVENTS_ON)
            await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW_BANDWIDTH})
            async with src.events() as events:
                await src.execute("migrate", {"uri": SINK_URI})
                await wait_status(src, "active")
                assert await src.execute("migrate_cancel") == {}
                statuses: list[str] = []
                while not statuses or statuses[-1] not in ("cancelled", "failed", "completed"):
                    statuses.append((await next_event(events, "MIGRATION")).data["status"])
            assert statuses[-1] == "cancelled", await src.execute("query-migrate")
            assert (await src.execute("query-migrate"))["status"] == "cancelled"
            assert (await src.execute("query-status"))["status"] == "running"
            # The guest can migrate again after a cancelled migration.
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await src.execute("migrate", {"uri": SINK_URI})
            await wait_status(src, "completed")
            await quit_engine(src, source)


async def test_two_clients_and_vanishing_clients(start_engine: StartEngine) -> None:
    source = start_engine("src")
    async with (
        connect_unix(source.path, retry_for=START_TIMEOUT) as first,
        connect_unix(source.path) as second,
    ):
        with trio.fail_after(60):
            await first.execute("migrate-set-capabilities", EVENTS_ON)
            async with first.events() as first_events, second.events() as second_events:
                # Both clients at once, interleaved.
                async with trio.open_nursery() as nursery:
                    for client in (first, second) * 5:
                        nursery.start_soon(client.execute, "query-migrate-parameters")
                        nursery.start_soon(client.execute, "query-status")

                # A client that sends stop and vanishes before the reply: the command still runs,
                # and every other client sees its event.
                async with raw_client(source.path) as leaver:
                    await leaver.send({"execute": "stop", "id": 1})
                event = await next_event(first_events, "STOP")
                assert event.name == "STOP"
                await next_event(second_events, "STOP")
                assert (await second.execute("query-status"))["status"] == "paused"
                await second.execute("cont")
                await next_event(first_events, "RESUME")

                # A client that starts a migration, then vanishes mid-command (half a request
                # follows the whole one): the migration still runs to completion.
                async with raw_client(source.path) as leaver:
                    await leaver.send_bytes(
                        json.dumps({"execute": "migrate", "arguments": {"uri": SINK_URI}}).encode()
                        + b'{"execute": "query-st'
                    )
                statuses: list[str] = []
                while not statuses or statuses[-1] not in ("completed", "failed"):
                    statuses.append((await next_event(second_events, "MIGRATION")).data["status"])
                assert statuses == ["setup", "active", "device", "completed"]
                assert (await first.execute("query-migrate"))["status"] == "completed"

            # The server still takes new clients.
            async with connect_unix(source.path) as third:
                assert (await third.execute("query-status"))["status"] == "postmigrate"
            # A second engine on this live socket is refused before it starts a guest.
            second_engine = await run_trimig("run", "--qmp", f"unix:{source.path}", check=False)
            assert second_engine.returncode == 1
            assert b"is in use by another process" in second_engine.stderr
            assert (await first.execute("query-status"))["status"] == "postmigrate"
            await quit_engine(first, source)
