"""The CLI (``trimig migrate``, ``info``, ``watch``, ``ctl``...) against two real engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import trio
from engine_processes import (
    MIGRATION_TIMEOUT,
    START_TIMEOUT,
    EngineProcess,
    StartEngine,
    assert_clean_exit,
    parse_bitmaps,
    run_trimig,
    tcp_uri,
)

# --- the CLI against real engines ----------------------------------------------------------


class _Watch:
    """A ``trimig watch`` subprocess whose output is read as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = {"stdout": bytearray(), "stderr": bytearray()}
        self.first_line = trio.Event()

    async def read(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.output[name] += chunk
            if b"\n" in chunk:
                self.first_line.set()


async def test_cli_drives_two_engines(start_engine: StartEngine) -> None:
    # Guests that dirty less leave the CPU to the many CLI processes.
    source = start_engine("src", "--dirty-rate", "16M")
    # --incoming with a URI (not defer): listening from the start, on a port of the kernel's.
    destination = start_engine("dst", "--dirty-rate", "16M", "--incoming", "tcp:127.0.0.1:0")
    # --wait: the engines are still starting (their sockets do not exist yet).
    assert not os.path.exists(source.path) and not os.path.exists(destination.path)
    tables: dict[str, str] = {}

    async def status_table(engine: EngineProcess) -> None:
        result = await run_trimig("info", "status", "--wait", str(START_TIMEOUT), engine.path)
        tables[engine.name] = result.stdout.decode()

    async with trio.open_nursery() as nursery:
        for engine in (source, destination):
            nursery.start_soon(status_table, engine)
    assert tables["src"].split() == ["running", "true", "status", "running"]
    assert tables["dst"].split() == ["running", "false", "status", "inmigrate"]
    assert "waiting for a migration on tcp:127.0.0.1:" in destination.stderr()
    refused = await run_trimig("info", "bitmaps", source.path, check=False)
    assert refused.returncode == 1 and b"no migration here" in refused.stderr, refused.stderr

    await run_trimig(
        "ctl",
        source.path,
        "migrate-set-capabilities",
        'capabilities=[{"capability": "events", "state": true}]',
    )
    info = json.loads((await run_trimig("info", "migrate", destination.path, "--json")).stdout)
    assert info["status"] == "setup"
    uri = tcp_uri(info)

    watches: dict[str, _Watch] = {}
    with trio.fail_after(MIGRATION_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for engine, extra in ((source, ["--json"]), (destination, [])):
                process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "trimig.cli",
                        "watch",
                        engine.path,
                        "--interval",
                        "0.1",
                        *extra,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                watch = watches[engine.name] = _Watch(process)
                assert process.stdout is not None and process.stderr is not None
                nursery.start_soon(watch.read, "stdout", process.stdout)
                nursery.start_soon(watch.read, "stderr", process.stderr)
            for watch in watches.values():  # each has subscribed and polled once
                await watch.first_line.wait()
            migrate = await run_trimig("migrate", "--qmp", source.path, uri)
            assert f"migration to {uri} started" in migrate.stdout.decode()
            for watch in watches.values():
                assert await watch.process.wait() == 0, watch.output["stderr"].decode()

    lines = [json.loads(line) for line in watches["src"].output["stdout"].splitlines()]
    assert lines[0] == {"query-migrate": {}}  # no migration yet when the watch began
    events = [line["data"]["status"] for line in lines if line.get("event") == "MIGRATION"]
    assert events == ["setup", "active", "device", "completed"]
    assert lines[-1]["query-migrate"]["status"] == "completed"
    progress = watches["dst"].output["stderr"].decode().splitlines()
    assert progress[0].startswith("setup") and progress[-1].startswith("completed")

    async with trio.open_nursery() as nursery:
        results: dict[str, Any] = {}

        async def query_status(engine: EngineProcess) -> None:
            result = await run_trimig("ctl", engine.path, "query-status", "--json")
            results[engine.name] = json.loads(result.stdout)["status"]

        for engine in (source, destination):
            nursery.start_soon(query_status, engine)
    assert results == {"src": "postmigrate", "dst": "running"}
    # trimig info bitmaps: the pages the destination received, all of them.
    dump = (await run_trimig("info", "bitmaps", destination.path)).stdout.decode()
    received = parse_bitmaps(dump)
    assert received and all(set(bits) == {"X"} for bits in received.values()), dump
    assert {kind for _, kind in received} == {"received"}

    async with trio.open_nursery() as nursery:
        for engine in (source, destination):
            nursery.start_soon(_quit_with_cli, engine)


async def _quit_with_cli(engine: EngineProcess) -> None:
    guests = engine.children()
    assert guests
    await run_trimig("ctl", engine.path, "quit")
    await engine.wait_exit()
    assert_clean_exit(engine, guests)
