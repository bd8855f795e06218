"""Postcopy when things go wrong: a bad return path, cancellation, a cut connection.

The designed outcomes (docs/postcopy.md, "Failures"):

* before PONG(0x42) (precopy, the switch, the package in flight, the package loading
  on the destination): the source reports ``failed`` (or ``cancelled``) and its guest
  runs again; the destination reports ``failed`` and never ran the guest;
* after PONG(0x42) (the destination runs the guest): both sides report
  ``postcopy-paused`` and raise MigrationPaused (a cancelled source re-raises
  Cancelled); nothing is resumed, and ``aclose()`` tears everything down.

Nothing may hang: every wait is bounded, and the suite's leak check (tests/conftest.py)
runs around each test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from typing import Any

import pytest
import trio
import trio.testing
from postcopy_harness import DEADLINE, Pair, TappedStream, postcopy_settings, run_pair

from trimig import codec
from trimig.channel import MigrationChannel
from trimig.demo import running_guest
from trimig.errors import GuestError, MigrationFailed, MigrationPaused
from trimig.guest.host import workload_command
from trimig.loadvm.reader import ReturnPathWriter
from trimig.migration import MigrationStatus
from trimig.ram_blocks import RamBlockSpec, default_block_specs
from trimig.savevm.outgoing import OutgoingMigration
from trimig.transports.socket import SocketStream

RAM = 8 << 20
SMALL_RAM = 4 << 20
FAULTING_RAM = 16 << 20  # see test_postcopy_e2e.py
#: A bad return path must end the migration this fast (the source reacts at once).
REACTION_DEADLINE = 10.0


# -- a fake destination ----------------------------------------------------------------


class FakeDestination:
    """The destination side of the stream, just far enough to reach a phase.

    Accepts one connection on a unix socket, reads the whole stream with the codec's
    StreamDecoder (draining it, so the source never blocks) and answers PINGs, the
    package's included unless ``answer_package`` is False. ``advised`` and ``packaged``
    are set when POSTCOPY_ADVISE and the PACKAGED blob arrive; ``send`` writes anything
    on the return path.
    """

    def __init__(self, path: str, *, answer_package: bool = True) -> None:
        self.path = path
        self.answer_package = answer_package
        self.advised = trio.Event()
        self.packaged = trio.Event()
        self.stream_ended = trio.Event()
        self.stream_error: BaseException | None = None
        self._sock: trio.socket.SocketType | None = None
        self._send_lock = trio.Lock()

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(self.path)
            listener.listen(1)
            task_status.started()
            sock, _ = await listener.accept()
        with sock:
            self._sock = sock
            try:
                await self._read(sock)
            except (OSError, trio.ClosedResourceError) as exc:
                self.stream_error = exc
            finally:
                self.stream_ended.set()

    async def _read(self, sock: trio.socket.SocketType) -> None:
        decoder = codec.StreamDecoder(local_page_sizes={"pc.ram": 4096})
        while True:
            event = decoder.next_event()
            if event is codec.NEED_DATA:
                data = await sock.recv(1 << 20)
                if not data:
                    return  # the source closed: our job is done
                decoder.receive_data(data)
                continue
            if isinstance(event, codec.Ping):
                await self.send(codec.encode_rp_pong(event.value))
            elif isinstance(event, codec.PostcopyAdvise):
                self.advised.set()
            elif isinstance(event, codec.Packaged):
                if self.answer_package:
                    package = codec.StreamDecoder(expect_header=False)
                    package.receive_data(event.blob)
                    package.receive_eof()
                    while not isinstance(inner := package.next_event(), codec.PostcopyRun):
                        if isinstance(inner, codec.Ping):
                            await self.send(codec.encode_rp_pong(inner.value))
                self.packaged.set()
            elif isinstance(event, codec.EndOfStream):
                return

    async def send(self, data: bytes) -> None:
        assert self._sock is not None
        async with self._send_lock:
            view = memoryview(data)
            while view:
                sent = await self._sock.send(view)
                view = view[sent:]


GARBAGE = b"\xff\xff\x00\x00"  # message type 65535
REQUEST_OUTSIDE = codec.encode_rp_req_pages(SMALL_RAM, 4096, "pc.ram")  # first byte past the end
REQUEST_UNKNOWN_BLOCK = codec.encode_rp_req_pages(0, 4096, "nope")
REQUEST_UNALIGNED = codec.encode_rp_req_pages(100, 4096, "pc.ram")
REQUEST_VALID = codec.encode_rp_req_pages(0, 4096, "pc.ram")


@pytest.mark.parametrize(
    ("phase", "frame", "error", "message"),
    [
        ("precopy", GARBAGE, MigrationFailed, "unknown return-path message type 65535"),
        ("precopy", REQUEST_VALID, MigrationFailed, "page request .* before postcopy started"),
        ("postcopy-device", REQUEST_OUTSIDE, MigrationFailed, "runs past the block's end"),
        ("postcopy-active", REQUEST_OUTSIDE, MigrationPaused, "runs past the block's end"),
        ("postcopy-active", REQUEST_UNKNOWN_BLOCK, MigrationPaused, "unknown RAM block 'nope'"),
        ("postcopy-active", REQUEST_UNALIGNED, MigrationPaused, "not aligned"),
        ("postcopy-active", GARBAGE, MigrationPaused, "unknown return-path message type"),
    ],
    ids=[
        "precopy-garbage",
        "precopy-early-request",
        "device-outside-block",
        "active-outside-block",
        "active-unknown-block",
        "active-unaligned",
        "active-garbage",
    ],
)
async def test_bad_return_path_is_an_error_on_the_source(
    phase: str, frame: bytes, error: type[Exception], message: str
) -> None:
    switch = phase != "precopy"
    capabilities, parameters = postcopy_settings(after_passes=1 if switch else 0)
    with tempfile.TemporaryDirectory(prefix="trimig-fake-") as tmp:
        fake = FakeDestination(
            os.path.join(tmp, "destination.sock"), answer_package=phase == "postcopy-active"
        )
        specs = [RamBlockSpec("pc.ram", SMALL_RAM)]
        with trio.fail_after(DEADLINE):
            async with running_guest(specs, workload_command()) as (guest, blocks):
                outgoing = OutgoingMigration(
                    guest, blocks, capabilities=capabilities, parameters=parameters
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(fake.serve)

                    async def misbehave() -> None:
                        if phase == "precopy":
                            await fake.advised.wait()
                        elif phase == "postcopy-device":
                            await fake.packaged.wait()
                        else:
                            await outgoing.status.wait_value(MigrationStatus.POSTCOPY_ACTIVE)
                        await fake.send(frame)

                    nursery.start_soon(misbehave)
                    with (
                        trio.fail_after(REACTION_DEADLINE),
                        pytest.raises(error, match=message) as raised,
                    ):
                        await outgoing.run(f"unix:{fake.path}")
                    nursery.cancel_scope.cancel()
                info = outgoing.query()
                if error is MigrationFailed:
                    assert outgoing.status.value is MigrationStatus.FAILED
                    # The guest runs again here, intact.
                    assert (await guest.query())["running"] is True
                    await guest.stop()
                    assert (await guest.verify()).verified
                else:
                    assert outgoing.status.value is MigrationStatus.POSTCOPY_PAUSED
                    # It runs on the destination now: never resumed here.
                    assert (await guest.query())["running"] is False
                assert info["status"] == outgoing.status.value.value
                assert str(raised.value.__cause__) in info["error-desc"]


async def test_return_path_writer_sends_whole_messages_when_cancelled() -> None:
    """A sender cancelled while its message is being written (e.g. the fault handler when
    postcopy ends) still writes it whole, so the path stays usable for the SHUT after."""
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # fill the socket so that the next write blocks
                filler += left.send(bytes(65536))
        stream = SocketStream(trio.socket.from_stdlib_socket(left), transport="unix", peer="pair")
        writer = ReturnPathWriter(MigrationChannel(stream, _owner=False))
        reader = trio.socket.from_stdlib_socket(right)
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def send_then_get_cancelled() -> None:
                    with scope:
                        await writer.send(REQUEST_VALID)

                nursery.start_soon(send_then_get_cancelled)
                await trio.testing.wait_all_tasks_blocked()  # blocked in the write
                scope.cancel()
                while filler:  # let the write finish
                    filler -= len(await reader.recv(min(filler, 1 << 16)))
            await writer.send(codec.encode_rp_shut(0))
            decoder = codec.ReturnPathDecoder()
            while (event := decoder.next_event()) is codec.NEED_DATA:
                decoder.receive_data(await reader.recv(4096))
            assert event == codec.ReqPages("pc.ram", 0, 4096)
            while (event := decoder.next_event()) is codec.NEED_DATA:
                decoder.receive_data(await reader.recv(4096))
            assert event == codec.Shut(0)


# -- cancel and cut at each point of the sequence ---------------------------------------


def when_source(event: str, action: str) -> Any:
    """A source event hook that cancels the source or cuts the connection at ``event``
    (``STOP``: the switch has begun, before discards and the package)."""

    def hook(pair: Pair, name: str, info: dict[str, Any]) -> None:
        if name == event:
            act(pair, action)

    return hook


def when_destination(status: str, action: str) -> Any:
    """A destination event hook acting, synchronously, when it enters ``status``."""

    def hook(pair: Pair, name: str, info: dict[str, Any]) -> None:
        if name == "MIGRATION" and info["status"] == status:
            act(pair, action)

    return hook


def act(pair: Pair, action: str) -> None:
    if action == "cancel":
        pair.source_scope.cancel()
    elif action == "cut":
        assert isinstance(pair.dest_stream, TappedStream)
        pair.dest_stream.cut()
    else:  # "cut-package": lose the PACKAGED blob after its first bytes
        assert isinstance(pair.dest_stream, TappedStream)
        pair.dest_stream.cut_inside_package(keep=12)


async def check_source_runs_again(pair: Pair) -> None:
    """After a failure before the point of no return the source guest runs, intact."""
    state = await pair.source_guest.query()
    pair.notes["source running"] = state["running"]
    await trio.sleep(0.05)
    await pair.source_guest.stop()
    pair.notes["source verdict"] = await pair.source_guest.verify()


@pytest.mark.parametrize(
    ("action", "where"),
    [
        ("cancel", "switch"),
        ("cut", "switch"),
        ("cut-package", "switch"),
        ("cancel", "listen"),
        ("cut", "listen"),
    ],
    ids=[
        "cancel-at-switch",
        "cut-at-switch",
        "cut-inside-package",
        "cancel-after-listen",
        "cut-after-listen",
    ],
)
async def test_failure_before_the_guest_runs_there_resumes_the_source(
    action: str, where: str
) -> None:
    capabilities, parameters = postcopy_settings()
    hooks: dict[str, Any] = {}
    if where == "switch":
        hooks["on_source_event"] = when_source("STOP", action)
    else:
        hooks["on_dest_event"] = when_destination("postcopy-device", action)
    pair = await run_pair(
        default_block_specs(RAM),
        capabilities=capabilities,
        parameters=parameters,
        wrap_dest_stream=TappedStream,
        after=check_source_runs_again,
        **hooks,
    )
    # Source: failed or cancelled, its guest running again and consistent.
    if action == "cancel":
        assert pair.source_cancelled and pair.source_error is None
        assert pair.outgoing.status.value is MigrationStatus.CANCELLED
    else:
        assert isinstance(pair.source_error, MigrationFailed), repr(pair.source_error)
        assert pair.outgoing.status.value is MigrationStatus.FAILED
    assert pair.notes["source running"] is True
    assert pair.notes["source verdict"].verified
    assert "postcopy-active" not in pair.source_statuses
    # Destination: failed, never ran the guest (and closed it).
    assert isinstance(pair.dest_error, MigrationFailed), repr(pair.dest_error)
    assert pair.incoming.status.value is MigrationStatus.FAILED
    assert "postcopy-active" not in pair.dest_statuses
    assert pair.incoming.guest is None
    if where == "listen":
        assert "postcopy-device" in pair.source_statuses
        assert "postcopy-device" in pair.dest_statuses
    if action == "cut-package":
        assert "postcopy-device" not in pair.dest_statuses  # the package never loaded


async def cancel_once_both_run(pair: Pair) -> None:
    """Control task: cancel the source once both sides are postcopy-active."""
    await pair.outgoing.status.wait_value(MigrationStatus.POSTCOPY_ACTIVE)
    await pair.incoming.status.wait_value(MigrationStatus.POSTCOPY_ACTIVE)
    pair.source_scope.cancel()


async def check_paused_then_close(pair: Pair) -> None:
    """Both sides paused: the source guest stays stopped, the destination guest is blocked
    on a page that will not come (it cannot even answer), and aclose() ends it promptly."""
    pair.notes["source running"] = (await pair.source_guest.query())["running"]
    guest = pair.incoming.guest
    assert guest is not None and guest.returncode is None
    with pytest.raises(GuestError, match="did not answer"):
        await guest.query(timeout=0.5)
    with trio.fail_after(3):
        await pair.incoming.aclose()
    assert pair.incoming.guest is None and pair.incoming.blocks == []
    assert guest.returncode is not None


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
@pytest.mark.parametrize("action", ["cancel", "cut"])
async def test_failure_after_run_pauses_both_sides(action: str, preempt: bool) -> None:
    # A slow background stream: many pages are still missing when the guest starts there.
    # With preempt the urgent reader's thread is running too, and must stop with the rest.
    capabilities, parameters = postcopy_settings(preempt=preempt, max_postcopy_bandwidth="4M")
    hooks: dict[str, Any] = {}
    if action == "cancel":
        hooks["control"] = cancel_once_both_run
    else:
        hooks["on_dest_event"] = when_destination("postcopy-active", "cut")
    pair = await run_pair(
        default_block_specs(FAULTING_RAM),
        capabilities=capabilities,
        parameters=parameters,
        wrap_dest_stream=TappedStream,
        after=check_paused_then_close,
        **hooks,
    )
    assert pair.outgoing.status.value is MigrationStatus.POSTCOPY_PAUSED
    assert pair.source_statuses[-2:] == ["postcopy-active", "postcopy-paused"]
    if action == "cancel":
        assert pair.source_cancelled and pair.source_error is None
    else:
        assert isinstance(pair.source_error, MigrationPaused), repr(pair.source_error)
    assert pair.notes["source running"] is False
    assert pair.incoming.status.value is MigrationStatus.POSTCOPY_PAUSED
    assert pair.dest_statuses[-2:] == ["postcopy-active", "postcopy-paused"]
    assert isinstance(pair.dest_error, MigrationPaused), repr(pair.dest_error)
    assert pair.incoming.query()["error-desc"]
