"""Real engines: ``trimig run`` subprocesses (each with the built-in guest, 64 MiB of RAM) driven
over their QMP sockets by QEMU's own qemu.qmp client, trimig's client, raw sockets and the CLI.

Every wait is bounded (trio.fail_after / asyncio.timeout), and every engine a test starts is
killed, with its guests, if the test did not shut it down itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qmp_helpers import listening, raw_client

from trimig.qmp.client import QmpClient, connect_unix
from trimig.qmp.protocol import QmpError

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
            sent = _bitmaps((await _qemu_execute(src, "x-dump-bitmaps"))["text"])
            received = _bitmaps((await _qemu_execute(dst, "x-dump-bitmaps"))["text"])
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


def _bitmaps(text: str) -> dict[tuple[str, str], str]:
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


# --- errors, several clients, vanishing clients (trimig's trio client) ----------------------


async def _wait_status(
    client: QmpClient, wanted: str, timeout: float = MIGRATION_TIMEOUT
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            info: dict[str, Any] = await client.execute("query-migrate")
            if info.get("status") == wanted:
                return info
            assert info.get("status") != "failed", info
            await trio.sleep(0.01)


async def _quit(client: QmpClient, engine: EngineProcess) -> None:
    guests = engine.children()
    assert guests, "the engine has no guest process"
    assert await client.execute("quit") == {}
    await engine.wait_exit()
    assert_clean_exit(engine, guests)


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
            await _wait_status(src, "active")
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
            info = await _wait_status(src, "completed")
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

            await _quit(src, source)
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
                await _wait_status(src, "active")
                assert await src.execute("migrate_cancel") == {}
                statuses: list[str] = []
                while not statuses or statuses[-1] not in ("cancelled", "failed", "completed"):
                    statuses.append((await _next_event(events, "MIGRATION")).data["status"])
            assert statuses[-1] == "cancelled", await src.execute("query-migrate")
            assert (await src.execute("query-migrate"))["status"] == "cancelled"
            assert (await src.execute("query-status"))["status"] == "running"
            # The guest can migrate again after a cancelled migration.
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await src.execute("migrate", {"uri": SINK_URI})
            await _wait_status(src, "completed")
            await _quit(src, source)


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
                event = await _next_event(first_events, "STOP")
                assert event.name == "STOP"
                await _next_event(second_events, "STOP")
                assert (await second.execute("query-status"))["status"] == "paused"
                await second.execute("cont")
                await _next_event(first_events, "RESUME")

                # A client that starts a migration, then vanishes mid-command (half a request
                # follows the whole one): the migration still runs to completion.
                async with raw_client(source.path) as leaver:
                    await leaver.send_bytes(
                        json.dumps({"execute": "migrate", "arguments": {"uri": SINK_URI}}).encode()
                        + b'{"execute": "query-st'
                    )
                statuses: list[str] = []
                while not statuses or statuses[-1] not in ("completed", "failed"):
                    statuses.append((await _next_event(second_events, "MIGRATION")).data["status"])
                assert statuses == ["setup", "active", "device", "completed"]
                assert (await first.execute("query-migrate"))["status"] == "completed"

            # The server still takes new clients.
            async with connect_unix(source.path) as third:
                assert (await third.execute("query-status"))["status"] == "postmigrate"
            # A second engine on this live socket is refused before it starts a guest.
            second_engine = await _trimig("run", "--qmp", f"unix:{source.path}", check=False)
            assert second_engine.returncode == 1
            assert b"is in use by another process" in second_engine.stderr
            assert (await first.execute("query-status"))["status"] == "postmigrate"
            await _quit(first, source)


async def _next_event(events: Any, name: str) -> Any:
    with trio.fail_after(MIGRATION_TIMEOUT):
        async for event in events:
            if event.name == name:
                return event
    raise AssertionError(f"the connection ended before {name}")


# --- the CLI against real engines ----------------------------------------------------------


async def _trimig(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
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
        result = await _trimig("info", "status", "--wait", str(START_TIMEOUT), engine.path)
        tables[engine.name] = result.stdout.decode()

    async with trio.open_nursery() as nursery:
        for engine in (source, destination):
            nursery.start_soon(status_table, engine)
    assert tables["src"].split() == ["running", "true", "status", "running"]
    assert tables["dst"].split() == ["running", "false", "status", "inmigrate"]
    assert "waiting for a migration on tcp:127.0.0.1:" in destination.stderr()
    refused = await _trimig("info", "bitmaps", source.path, check=False)
    assert refused.returncode == 1 and b"no migration here" in refused.stderr, refused.stderr

    await _trimig(
        "ctl",
        source.path,
        "migrate-set-capabilities",
        'capabilities=[{"capability": "events", "state": true}]',
    )
    info = json.loads((await _trimig("info", "migrate", destination.path, "--json")).stdout)
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
            migrate = await _trimig("migrate", "--qmp", source.path, uri)
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
            result = await _trimig("ctl", engine.path, "query-status", "--json")
            results[engine.name] = json.loads(result.stdout)["status"]

        for engine in (source, destination):
            nursery.start_soon(query_status, engine)
    assert results == {"src": "postmigrate", "dst": "running"}
    # trimig info bitmaps: the pages the destination received, all of them.
    dump = (await _trimig("info", "bitmaps", destination.path)).stdout.decode()
    received = _bitmaps(dump)
    assert received and all(set(bits) == {"X"} for bits in received.values()), dump
    assert {kind for _, kind in received} == {"received"}

    async with trio.open_nursery() as nursery:
        for engine in (source, destination):
            nursery.start_soon(_quit_with_cli, engine)


async def _quit_with_cli(engine: EngineProcess) -> None:
    guests = engine.children()
    assert guests
    await _trimig("ctl", engine.path, "quit")
    await engine.wait_exit()
    assert_clean_exit(engine, guests)


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
                    statuses.append((await _next_event(events, "MIGRATION")).data["status"])
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
        watch = await _trimig("watch", source.path, "--json", check=False)
        assert watch.returncode == 1, watch.stderr.decode()
        final = json.loads(watch.stdout.decode().splitlines()[-1])
        assert final["query-migrate"]["status"] == "failed"
        assert final["query-migrate"]["error-desc"] == VERDICT
        assert watch.stderr.decode().splitlines() == [f"trimig: error: migration failed: {VERDICT}"]
        watch = await _trimig("watch", destination.path, check=False)
        assert watch.returncode == 1
        error = watch.stderr.decode().splitlines()[-1]
        assert error.startswith("trimig: error: migration failed: ") and REFUSAL in error, error
        assert "Traceback" not in watch.stderr.decode()

        with trio.fail_after(60):
            # The source guest is whole: it migrates again (into a sink).
            await src.execute("migrate", {"uri": SINK_URI})
            assert (await _wait_status(src, "completed"))["ram"]["remaining"] == 0
            await _quit(src, source)
            assert await dst.execute("quit") == {}
            await destination.wait_exit()
        assert_clean_exit(destination, [])


async def test_control_commands_name_their_failures(start_engine: StartEngine) -> None:
    """A QMP error reply, or no engine at PATH: one line on stderr, and with --json the
    error on stdout, shaped as QMP's; exit status 1."""
    source = start_engine("src", "--dirty-rate", "16M")
    await _trimig("info", "status", "--wait", str(START_TIMEOUT), source.path)
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
            result = await _trimig(*words, *(["--json"] if as_json else []), check=False)
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
        await _quit(src, source)


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
            await _wait_status(client, "active")
        guests = engine.children()
        assert guests
        engine.process.send_signal(signum)
        assert await engine.wait_exit() == 0
    assert_clean_exit(engine, guests)
    assert f"terminating on signal {signal.Signals(signum).name}" in engine.stderr()


# --- the README's two-engine section, run as written (paths, port and size swapped) ---------


README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _readme_snippets() -> tuple[str, str]:
    """The shell and the Python snippet of the README's "Two engines driven over QMP"."""
    with open(README) as file:
        text = file.read()
    section = text[text.index("## Two engines driven over QMP") :]
    shell = section[section.index("```sh\n") + 6 :]
    python = section[section.index("```python\n") + 10 :]
    return shell[: shell.index("```")], python[: python.index("```")]


async def _run_script(script: str, directory: str) -> str:
    """Run a bash script in its own process group (killed whole if it hangs); its output."""
    path = os.path.join(directory, "script.sh")
    with open(path, "w") as file:
        file.write("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script)
    output = os.path.join(directory, "script.out")
    with open(output, "wb") as out:
        process = await trio.lowlevel.open_process(
            ["bash", path], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with trio.fail_after(60):
                code = await process.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    with open(output, errors="replace") as file:
        text = file.read()
    assert code == 0, text
    return text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_readme_two_engine_snippets_work() -> None:
    shell, python = _readme_snippets()
    with tempfile.TemporaryDirectory(prefix="tmrd") as directory:

        def adapt(text: str) -> str:
            return (
                text.replace("/tmp/src.sock", f"{directory}/src.sock")
                .replace("/tmp/dst.sock", f"{directory}/dst.sock")
                .replace("--ram 256M", f"--ram {RAM}")
            )

        shell = adapt(shell).replace(":4444", f":{_free_port()}")
        output = await _run_script(shell + "wait\n", directory)
        assert "migration to tcp:127.0.0.1:" in output and '"status": "running"' in output
        assert "completed" in output and "dirty syncs (passes)" in output

        script = os.path.join(directory, "migrate.py")
        with open(script, "w") as file:
            file.write(adapt(python))
        start = "".join(
            line + "\n" for line in shell.splitlines() if "--wait" in line or " & " in line
        )
        output = await _run_script(f"{start}{sys.executable} {script}\nwait\n", directory)
        assert "setup\nactive\ndevice\ncompleted\n" in output, output
        assert "'status': 'running'" in output
        assert not os.path.exists(f"{directory}/src.sock")
        assert not os.path.exists(f"{directory}/dst.sock")
