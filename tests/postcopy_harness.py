"""Both sides of a real migration in one trio run, for the postcopy end-to-end tests.

Unlike ``trimig.demo.migrate_locally`` every outcome is kept as a value (statuses,
errors, the destination guest's verdict), the destination's accepted stream can be
wrapped (``TappedStream`` cuts it like a pulled cable, or calls back, at a chosen point), and
callbacks see each side's events as they happen, so a test can cancel or cut at a
precise point of the postcopy sequence.

Nothing here hides a socket's file descriptor from the engines: over tcp and unix both
sides run the OS-thread variants of their postcopy loops (the source's return-path
reader and urgent sender; the destination's fault handler, main listener and urgent
reader), as real runs do. The in-process rdma transport has no descriptor, so it runs
their trio variants.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import attrs
import numpy as np
import trio

from trimig import codec
from trimig.demo import running_guest, transport_uris
from trimig.guest.host import GuestProcess, Verdict, workload_command
from trimig.loadvm.incoming import IncomingMigration
from trimig.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from trimig.ram_blocks import RamBlock, RamBlockSpec
from trimig.savevm.outgoing import OutgoingMigration
from trimig.transports import ByteStream, Listener, listen
from trimig.transports.base import Buffer, RegionRegistry

#: No single wait of a test may take longer than this (seconds).
DEADLINE = 20.0

EventHook = Callable[["Pair", str, dict[str, Any]], None]
StreamWrapper = Callable[[ByteStream], ByteStream]

#: The bytes that start a PACKAGED command: 0x08, be16 7, be16 4 (its be32 length follows).
PACKAGED_MARKER = codec.encode_command(codec.MigCmd.PACKAGED, b"\0\0\0\0")[:5]
#: SWITCHOVER_START, the first command of the switch: everything before it is precopy.
SWITCHOVER_MARKER = codec.encode_switchover_start()


def postcopy_settings(
    *, preempt: bool = False, after_passes: int = 1, **parameters: Any
) -> tuple[MigrationCapabilities, MigrationParameters]:
    """Capabilities and parameters for a postcopy switch after ``after_passes`` passes."""
    capabilities = MigrationCapabilities()
    capabilities.set("postcopy-ram", True)
    if preempt:
        capabilities.set("postcopy-preempt", True)
    settings = MigrationParameters()
    settings.set("x-postcopy-after-passes", after_passes)
    for name, value in parameters.items():
        settings.set(name.replace("_", "-"), value)
    return capabilities, settings


class TappedStream:
    """A socket ByteStream proxy through which a test acts at a point of the stream.

    * ``cut()`` shuts the socket down both ways, now, like a pulled cable: our blocked
      reads see EOF, our writes fail, and the peer sees the same.
    * ``cut_inside_package(keep)`` cuts when the PACKAGED command arrives, letting its
      5-byte command header and ``keep`` more bytes (its be32 length, then the blob)
      through and losing the rest.
    * ``call_before(marker, callback)`` calls ``callback()`` once the reader has consumed
      every byte before the next ``marker`` (a reader only reads again when its decoder
      holds no whole event, so everything before the marker has been acted on).

    It has the socket's ``fileno``, so the destination's threads (fault handler, main
    listener after LISTEN) run as over a plain socket: the taps act on what trio reads
    before LISTEN (precopy, the switch, the package); ``cut`` acts on the socket itself.
    """

    def __init__(self, inner: ByteStream) -> None:
        fileno = getattr(inner, "fileno", None)
        if fileno is None:
            raise TypeError(f"only socket streams can be tapped, not {type(inner).__name__}")
        self._inner = inner
        self._fd: int = fileno()
        self.cut_done = False
        self._marker: bytes | None = None
        self._on_marker: Callable[[bytes, int], int] | None = None
        self._tail = b""
        self._held = b""
        self._held_callback: Callable[[], None] | None = None

    # ByteStream -----------------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    @property
    def transport(self) -> str:
        return str(getattr(self._inner, "transport", "socket"))

    @property
    def has_return_path(self) -> bool:
        return self._inner.has_return_path

    @property
    def regions(self) -> RegionRegistry | None:
        return self._inner.regions

    async def send_buffers(self, buffers: Sequence[Buffer]) -> None:
        await self._inner.send_buffers(buffers)

    async def receive_into(self, buffer: memoryview) -> int:
        if self._held_callback is not None:
            callback, self._held_callback = self._held_callback, None
            callback()
        if self._held:
            count = min(len(buffer), len(self._held))
            buffer[:count] = self._held[:count]
            self._held = self._held[count:]
            return count
        count = await self._inner.receive_into(buffer)
        if self._marker is None or not count:
            return count
        data = self._tail + bytes(buffer[:count])
        where = data.find(self._marker)
        if where < 0:
            self._tail = data[-(len(self._marker) - 1) :]
            return count
        assert self._on_marker is not None
        chunk, before = data[len(self._tail) :], len(self._tail)
        self._marker, self._tail = None, b""
        # Offset of the marker in this read (negative: it began in the previous one).
        return self._on_marker(chunk, where - before)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    # the taps -------------------------------------------------------------------------
    def cut(self) -> None:
        """Shut the connection down in both directions, now (synchronous)."""
        if self.cut_done:
            return
        self.cut_done = True
        duplicate = socket.socket(fileno=os.dup(self._fd))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        finally:
            duplicate.close()

    def cut_inside_package(self, keep: int) -> None:
        def at_marker(chunk: bytes, where: int) -> int:
            self.cut()
            return max(0, min(len(chunk), where + len(PACKAGED_MARKER) + keep))

        self._watch(PACKAGED_MARKER, at_marker)

    def call_before(self, marker: bytes, callback: Callable[[], None]) -> None:
        def at_marker(chunk: bytes, where: int) -> int:
            if where <= 0:  # the reader already consumed everything before it
                callback()
                return len(chunk)
            self._held = chunk[where:]
            self._held_callback = callback
            return where

        self._watch(marker, at_marker)

    def _watch(self, marker: bytes, action: Callable[[bytes, int], int]) -> None:
        self._marker, self._on_marker, self._tail = marker, action, b""


@attrs.define
class Pair:
    """A source guest and both migration objects; outcomes are filled in by ``run``."""

    source_guest: GuestProcess
    source_blocks: list[RamBlock]
    outgoing: OutgoingMigration
    incoming: IncomingMigration
    connect_uri: str = ""
    source_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    source_error: BaseException | None = None
    source_cancelled: bool = False
    dest_error: BaseException | None = None
    dest_stream: ByteStream | None = None
    source_events: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    dest_events: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    verdict: Verdict | None = None
    #: The destination's RAM (through its memfds) after precopy, before the switch.
    dest_snapshot_before_switch: list[bytes] | None = None
    #: Bytes the destination read on the urgent channel of postcopy-preempt (its
    #: ``x-postcopy-preempt-bytes``), once it ended.
    urgent_bytes_received: int = 0
    urgent_connections: int = 0
    #: Whatever a test's hooks want to keep.
    notes: dict[str, Any] = attrs.field(factory=dict)

    @property
    def source_statuses(self) -> list[str]:
        return [info["status"] for name, info in self.source_events if name == "MIGRATION"]

    @property
    def dest_statuses(self) -> list[str]:
        return [info["status"] for name, info in self.dest_events if name == "MIGRATION"]


def assert_completed_and_verified(pair: Pair) -> None:
    """Both sides completed through the designed states; the moved guest verified."""
    assert pair.source_error is None, repr(pair.source_error)
    assert pair.dest_error is None, repr(pair.dest_error)
    assert pair.outgoing.status.value is MigrationStatus.COMPLETED
    assert pair.incoming.status.value is MigrationStatus.COMPLETED
    assert pair.verdict is not None and pair.verdict.verified, pair.verdict
    # The designed sequence of states on each side.
    assert pair.source_statuses == [
        "setup",
        "active",
        "device",
        "postcopy-device",
        "postcopy-active",
        "completed",
    ]
    assert pair.dest_statuses == [
        "setup",
        "active",
        "postcopy-device",
        "postcopy-active",
        "completed",
    ]
    source = pair.outgoing.query()
    assert source["ram"]["postcopy-bytes"] > 0  # pages really went after the switch
    assert source["ram"]["remaining"] == 0


@contextlib.contextmanager
def busy_cores(count: int | None = None) -> Iterator[None]:
    """CPU contention: a process spinning on each core (``count`` of them) while the block
    runs; each is killed and reaped at the end."""
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(count or os.cpu_count() or 2)
    ]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def read_block(block: RamBlock) -> bytes:
    """A block's memory read through its memfd (holes read as zeros and stay holes)."""
    return os.pread(block.fd, block.size, 0)


async def run_pair(
    specs: Sequence[RamBlockSpec],
    *,
    transport: str = "unix",
    capabilities: MigrationCapabilities,
    parameters: MigrationParameters,
    source_command: Sequence[str] | None = None,
    dest_command: Sequence[str] | None = None,
    warmup: float = 0.3,
    run_after: float = 0.2,
    wrap_dest_stream: StreamWrapper | None = None,
    on_source_event: EventHook | None = None,
    on_dest_event: EventHook | None = None,
    snapshot_dest_before_switch: bool = False,
    control: Callable[[Pair], Awaitable[None]] | None = None,
    after: Callable[[Pair], Any] | None = None,
) -> Pair:
    """Start a guest, migrate it over ``transport``, keep every outcome.

    After a completed migration the destination guest runs ``run_after`` s and is
    verified (``verdict``). ``control(pair)`` runs beside the migration (cancelled once
    both sides have ended); ``after(pair)`` (sync or async) runs while both sides'
    objects still exist, before anything is closed. Every wait is bounded by DEADLINE.
    """
    source_command = list(source_command or workload_command(dirty_rate="max"))
    dest_command = list(dest_command or source_command)
    async with transport_uris(transport) as (listen_uri, connect_uri, options):
        pair: Pair | None = None

        def source_hook(name: str, info: dict[str, Any]) -> None:
            assert pair is not None
            pair.source_events.append((name, info))
            if name == "STOP" and snapshot_dest_before_switch:
                # Once the destination has loaded all of precopy, before the discards.
                assert isinstance(pair.dest_stream, TappedStream)
                pair.dest_stream.call_before(SWITCHOVER_MARKER, take_snapshot)
            if on_source_event is not None:
                on_source_event(pair, name, info)

        def take_snapshot() -> None:
            assert pair is not None
            pair.dest_snapshot_before_switch = [read_block(b) for b in pair.incoming.blocks]

        if snapshot_dest_before_switch and wrap_dest_stream is None:
            wrap_dest_stream = TappedStream

        def dest_hook(name: str, info: dict[str, Any]) -> None:
            assert pair is not None
            pair.dest_events.append((name, info))
            if on_dest_event is not None:
                on_dest_event(pair, name, info)

        incoming = IncomingMigration(
            specs,
            guest_command=dest_command,
            capabilities=capabilities,
            listen_options=options,
            on_event=dest_hook,
        )
        try:
            with trio.fail_after(DEADLINE):
                async with running_guest(specs, source_command) as (guest, blocks):
                    outgoing = OutgoingMigration(
                        guest,
                        blocks,
                        capabilities=capabilities,
                        parameters=parameters,
                        connect_options=options,
                        on_event=source_hook,
                    )
                    pair = Pair(guest, blocks, outgoing, incoming)
                    async with trio.open_nursery() as nursery:
                        address = await nursery.start(
                            _receive, pair, listen_uri, options, wrap_dest_stream
                        )
                        pair.connect_uri = connect_uri.format(address=address)
                        control_scope = trio.CancelScope()
                        if control is not None:

                            async def run_control() -> None:
                                assert pair is not None and control is not None
                                with control_scope:
                                    await control(pair)

                            nursery.start_soon(run_control)
                        await trio.sleep(warmup)
                        with pair.source_scope:
                            try:
                                await outgoing.run(pair.connect_uri)
                            except Exception as exc:  # kept as a value
                                pair.source_error = exc
                        pair.source_cancelled = pair.source_scope.cancelled_caught
                        await incoming.status.wait_value(
                            lambda s: (
                                s
                                in (
                                    MigrationStatus.COMPLETED,
                                    MigrationStatus.FAILED,
                                    MigrationStatus.POSTCOPY_PAUSED,
                                )
                            )
                        )
                        control_scope.cancel()
                    if incoming.status.value is MigrationStatus.COMPLETED and run_after >= 0:
                        await trio.sleep(run_after)
                        assert incoming.guest is not None
                        await incoming.guest.stop()
                        pair.verdict = await incoming.guest.verify()
                    if after is not None:
                        result = after(pair)
                        if hasattr(result, "__await__"):
                            await result
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(DEADLINE):
                await incoming.aclose()
        assert pair is not None
        return pair


async def _receive(
    pair: Pair,
    uri: str,
    options: dict[str, Any],
    wrap: StreamWrapper | None,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    """The destination: accept one connection (wrapped), load the migration, keep the error."""
    listener = CountingListener(await listen(uri, **options), pair)
    try:
        task_status.started(str(listener.address))
        stream = await listener.accept()
        if wrap is not None:
            stream = wrap(stream)
        pair.dest_stream = stream
        try:
            await pair.incoming.run(stream, listener=listener)
        except Exception as exc:  # kept as a value
            pair.dest_error = exc
        pair.urgent_bytes_received = int(pair.incoming.query().get("x-postcopy-preempt-bytes", 0))
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()


class CountingListener:
    """A Listener proxy: connections after the first (the urgent channel) are counted. The
    streams themselves are handed over as accepted (the urgent reader's thread reads the
    socket itself)."""

    def __init__(self, inner: Listener, pair: Pair) -> None:
        self._inner = inner
        self._pair = pair
        self._accepted = 0

    @property
    def address(self) -> Any:
        return self._inner.address

    async def accept(self) -> ByteStream:
        stream = await self._inner.accept()
        self._accepted += 1
        if self._accepted == 1:
            return stream
        self._pair.urgent_connections += 1
        return stream

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> CountingListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def pages_differing(before: bytes, after: bytes) -> np.ndarray:
    """Indices of the 4 KiB pages that differ between two equal-sized images."""
    a = np.frombuffer(before, dtype=np.uint8).reshape(-1, 4096)
    b = np.frombuffer(after, dtype=np.uint8).reshape(-1, 4096)
    return np.flatnonzero((a != b).any(axis=1))
