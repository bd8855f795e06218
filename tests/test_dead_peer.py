"""Dead-peer detection (x-channel-timeout): a channel that moves nothing for the bound fails.

Real sockets: a peer that accepts and never reads, a source that connects and goes
silent, and a loopback proxy that stops forwarding (tests/cutting_proxy.py). In precopy
the migration fails within the bound and the source guest runs on, intact; the
QMP/postcopy side (both engines pause) is in tests/test_recovery.py.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import trio
from precopy_harness import assert_runs_undisturbed, source_guest

from trimig.errors import ConfigError, MigrationFailed
from trimig.loadvm.incoming import IncomingMigration
from trimig.migration import MigrationParameters, MigrationStatus
from trimig.ram_blocks import default_block_specs
from trimig.savevm.outgoing import OutgoingMigration
from trimig.transports import connect, listen, set_channel_timeout

TIMEOUT_MS = 1500
#: How far past the bound a detection may come on a loaded machine.
SLACK = 8.0


def parameters(timeout_ms: int = TIMEOUT_MS) -> MigrationParameters:
    parameters = MigrationParameters()
    parameters.set("x-channel-timeout", timeout_ms)
    return parameters


def test_parameter_is_named_and_bounded() -> None:
    parameters = MigrationParameters()
    assert parameters.query()["x-channel-timeout"] == 30_000
    assert parameters.channel_timeout == 30.0
    parameters.set("x-channel-timeout", 0)
    assert parameters.channel_timeout is None
    with pytest.raises(ConfigError, match="x-channel-timeout"):
        parameters.set("x-channel-timeout", -1)


async def test_tcp_socket_gets_keepalive_and_user_timeout() -> None:
    async with await listen("tcp:127.0.0.1:0") as listener:
        stream = await connect(str(listener.address))
        try:
            assert set_channel_timeout(stream, 12.0)
            sock = socket.socket(fileno=os.dup(stream.fileno()))  # type: ignore[attr-defined]
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_000
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
            finally:
                sock.close()
        finally:
            await stream.aclose()


class SilentPeer:
    """Accepts connections and never reads a byte (tiny receive buffer: fills at once)."""

    def __init__(self, transport: str, directory: str) -> None:
        if transport == "tcp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.sock.bind(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            path = os.path.join(directory, "silent.sock")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            self.uri = f"unix:{path}"
        self.sock.listen(8)
        self.accepted: list[socket.socket] = []

    async def serve(self) -> None:
        self.sock.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            connection, _ = self.sock.accept()
            self.accepted.append(connection)

    def close(self) -> None:
        for connection in self.accepted:
            connection.close()
        self.sock.close()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_precopy_to_a_peer_that_never_reads_fails_in_time(transport: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tmdead") as directory:
        peer = SilentPeer(transport, directory)
        try:
            async with source_guest() as (guest, blocks), trio.open_nursery() as nursery:
                nursery.start_soon(peer.serve)
                outgoing = OutgoingMigration(guest, blocks, parameters=parameters())
                started = time.monotonic()
                with trio.fail_after(TIMEOUT_MS / 1000 + SLACK + 10):
                    with pytest.raises(MigrationFailed) as caught:
                        await outgoing.run(peer.uri)
                elapsed = time.monotonic() - started
                nursery.cancel_scope.cancel()
                assert peer.accepted, "the source never connected"
                assert outgoing.status.value is MigrationStatus.FAILED
                assert "x-channel-timeout" in str(caught.value), caught.value
                assert "took nothing for 1.5 s" in outgoing.query()["error-desc"]
                # The bound and the verdict wait (2 s) and cleanup, not TCP's minutes.
                assert elapsed < TIMEOUT_MS / 1000 + SLACK, elapsed
                await assert_runs_undisturbed(guest, blocks)
        finally:
            peer.close()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_destination_fails_when_the_source_goes_silent(transport: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tmdead") as directory:
        uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{directory}/d.sock"
        incoming = IncomingMigration(default_block_specs(16 << 20), parameters=parameters())
        async with trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def receive(*, task_status: trio.TaskStatus[str]) -> None:
                try:
                    await incoming.listen_and_run(uri, task_status=task_status)
                except MigrationFailed as exc:
                    errors.append(exc)

            address = await nursery.start(receive)
            stream = await connect(address)
            try:
                await stream.send_buffers([b"QEVM"])  # half a file header, then silence
                started = time.monotonic()
                with trio.fail_after(TIMEOUT_MS / 1000 + SLACK + 10):
                    await incoming.status.wait_value(lambda s: s is MigrationStatus.FAILED)
                assert time.monotonic() - started < TIMEOUT_MS / 1000 + SLACK
            finally:
                await stream.aclose()
        assert errors and "x-channel-timeout" in str(errors[0]), errors
        assert "nothing received from the peer for 1.5 s" in incoming.query()["error-desc"]
