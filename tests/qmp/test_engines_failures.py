"""Real engines that fail and stop: a destination that refuses the stream, control commands
that fail, an engine shut down by SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import pytest
import trio
from engine_processes import (
    EVENTS_ON,
    MIGRATION_TIMEOUT,
    SINK_URI,
    SLOW_BANDWIDTH,
    START_TIMEOUT,
    StartEngine,
    assert_clean_exit,
    next_event,
    quit_engine,
    run_trimig,
    tcp_uri,
    wait_status,
)

from trimig.qmp.client import QmpClient, connect_unix

# --- failures: a destination that refuses the stream, commands that fail -------------------

#: The built-in workload, except that its load-state refuses every device state.
REFUSING_GUEST = [
    sys.executable,
    os.path.join(os.path.dirname(__file__), "..", "refusing_guest.py"),
]
REFUSAL = "this guest refuses every device state"
VERDICT = "the destination failed to load the stream (SHUT status 1)"


async def _wait_finished(client: QmpClient) -> dict[str, Any]:
    with trio.fail_after(MIGRATION_TIMEOUT):
        while True:
            info: dict[str, Any] = await client.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            await trio.sleep(0.01)


async def test_source_engine_fails_when_the_destination_refuses(start_engine: StartEngine) -> None:
    """The destination engine's guest refuses its device state at load-state, after the
    whole stream came: QMP ``migrate`` on the source ends ``failed`` with the destination's
    verdict (its SHUT(1) on the return path), not ``completed``; the source guest runs on
    and migrates again. ``trimig watch`` names the failure on stderr and in --json."""
    source = start_engine("src", "--dirty-rate", "16M")
    destination = start_engine("dst", "--incoming", "defer", "--", *REFUSING_GUEST)
    async with (
        connect_unix(source.path, retry_for=START_TIMEOUT) as src,
        connect_unix(destination.path, retry_for=START_TIMEOUT) as dst,
    ):
        with trio.fail_after(60):
            capabilities = await src.execute("query-migrate-capabilities")
            assert {"capability": "return-path", "state": True} in capabilities
            await src.execute("migrate-set-capabilities", EVENTS_ON)
            await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            uri = tcp_uri(await dst.execute("query-migrate"))
            async with src.events() as events:
                await src.execute("migrate", {"uri": uri})
                statuses: list[str] = []
                while not statuses or statuses[-1] not in ("cancelled", "failed", "completed"):
                    statuses.append((await next_event(events, "MIGRATION")).data["status"])
            assert statuses == ["setup", "active", "device", "failed"], statuses
            info = await _wait_finished(src)
            assert info["status"] == "failed", info
            assert info["error-desc"] == VERDICT, info
            assert await src.execute("query-status") == {
                "running": True,
                "singlestep": False,
                "status": "running",
            }
            refused = await _wait_finished(dst)
            assert refused["status"] == "failed" and REFUSAL in refused["error-desc"], refused

        # trimig watch on each: exit status 1, the failure named in one line on stderr,
        # and with --json in the final query-migrate on stdout.
        watch = await run_trimig("watch", source.path, "--json", check=False)
        assert watch.returncode == 1, watch.stderr.decode()
        final = json.loads(watch.stdout.decode().splitlines()[-1])
        assert final["query-migrate"]["status"] == "failed"
        assert final["query-migrate"]["error-desc"] == VERDICT
        assert watch.stderr.decode().splitlines() == [f"trimig: error: migration failed: {VERDICT}"]
        watch = await run_trimig("watch", destination.path, check=False)
        assert watch.returncode == 1
        error = watch.stderr.decode().splitlines()[-1]
        assert error.startswith("trimig: error: migration failed: ") and REFUSAL in error, error
        assert "Traceback" not in watch.stderr.decode()

        with trio.fail_after(60):
            # The source guest is whole: it migrates again (into a sink).
            await src.execute("migrate", {"uri": SINK_URI})
            assert (await wait_status(src, "completed"))["ram"]["remaining"] == 0
            await quit_engine(src, source)
            assert await dst.execute("quit") == {}
            await destination.wait_exit()
        assert_clean_exit(destination, [])


async def test_control_commands_name_their_failures(start_engine: StartEngine) -> None:
    """A QMP error reply, or no engine at PATH: one line on stderr, and with --json the
    error on stdout, shaped as QMP's; exit status 1."""
    source = start_engine("src", "--dirty-rate", "16M")
    await run_trimig("info", "status", "--wait", str(START_TIMEOUT), source.path)
    missing = os.path.join(os.path.dirname(source.path), "nobody.sock")
    cases = [
        (["ctl", source.path, "no-such-command"], "CommandNotFound", "no-such-command"),
        (["ctl", source.path, "migrate", "uri=bogus:1"], "GenericError", "unknown transport"),
        (["migrate", "--qmp", source.path, "bogus:1"], "GenericError", "unknown transport"),
        (["info", "migrate", missing], "TransportError", "No such file or directory"),
        (["cancel", missing], "TransportError", "No such file or directory"),
    ]
    for words, error_class, expected in cases:
        for as_json in (False, True):
            result = await run_trimig(*words, *(["--json"] if as_json else []), check=False)
            stderr = result.stderr.decode()
            assert result.returncode == 1, (words, stderr)
            (line,) = stderr.splitlines()
            assert line.startswith("trimig: error: ") and expected in line, (words, stderr)
            if as_json:
                reply = json.loads(result.stdout)
                assert reply["error"]["class"] == error_class, (words, reply)
                assert expected in reply["error"]["desc"] and reply["error"]["desc"] in line
            else:
                assert result.stdout == b"", words
    async with connect_unix(source.path) as src:
        await quit_engine(src, source)


# --- shutdown by signal --------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "migrating"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
async def test_signals_shut_an_engine_down_cleanly(
    start_engine: StartEngine, signum: int, migrating: bool
) -> None:
    engine = start_engine("src")
    async with connect_unix(engine.path, retry_for=START_TIMEOUT) as client:
        if migrating:
            await client.execute("migrate-set-parameters", {"max-bandwidth": SLOW_BANDWIDTH})
            await client.execute("migrate", {"uri": SINK_URI})
            await wait_status(client, "active")
        guests = engine.children()
        assert guests
        engine.process.send_signal(signum)
        assert await engine.wait_exit() == 0
    assert_clean_exit(engine, guests)
    assert f"terminating on signal {signal.Signals(signum).name}" in engine.stderr()
