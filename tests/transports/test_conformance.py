"""One conformance suite for every transport: tcp, unix, exec, rdma in-process and rdma:PATH.

Each test runs on real sockets, real ``sh -c`` children (exec goes writer -> FIFO -> reader)
and real shared memory.
"""

from __future__ import annotations

import mmap
import os
import socket

import numpy as np
import pytest
import trio
from leakcheck import ResourceSnapshot, assert_no_leaks
from transport_pairs import TRANSPORTS, Setup, connected, make_setup

from trimig.channel import MigrationChannel
from trimig.errors import TransportError
from trimig.transports import IOV_MAX, ByteStream, MemoryFabric, connect

PAGE = 4096
WITH_RETURN_PATH = [name for name in TRANSPORTS if name != "exec"]
RDMA = ["rdma-mem", "rdma-socket"]


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def gather_batches(data: bytes, seed: int) -> list[list[memoryview]]:
    """``data`` cut into page views and small odd pieces, IOV_MAX entries per batch."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([8, 13, PAGE, PAGE, PAGE, PAGE, 3 * PAGE], size=len(data) // PAGE + 1)
    view = memoryview(data)
    pieces: list[memoryview] = []
    offset = 0
    for size in sizes:
        if offset >= len(data):
            break
        pieces.append(view[offset : offset + int(size)])
        offset += int(size)
    if offset < len(data):
        pieces.append(view[offset:])
    return [pieces[i : i + IOV_MAX] for i in range(0, len(pieces), IOV_MAX)]


async def receive_all(stream: ByteStream, size_hint: int, *, chunk: int = 1 << 20) -> bytes:
    """Everything until EOF, read in ``chunk``-byte receive_into calls."""
    buffer = bytearray(size_hint + chunk)
    view = memoryview(buffer)
    have = 0
    while True:
        if have + chunk > len(buffer):
            buffer.extend(bytes(chunk))
            view = memoryview(buffer)
        count = await stream.receive_into(view[have : have + chunk])
        if count == 0:
            return bytes(buffer[:have])
        have += count


async def send_all_then_eof(stream: ByteStream, batches: list[list[memoryview]]) -> None:
    for batch in batches:
        await stream.send_buffers(batch)
    await stream.send_eof()


@pytest.fixture(params=WITH_RETURN_PATH)
def duplex_setup(request: pytest.FixtureRequest, short_tmp: str) -> Setup:
    return make_setup(request.param, short_tmp)


@pytest.fixture(params=RDMA)
def rdma_setup(request: pytest.FixtureRequest, short_tmp: str) -> Setup:
    return make_setup(request.param, short_tmp)


async def test_large_gather_write_arrives_intact(setup: Setup) -> None:
    data = random_bytes(64 << 20, seed=1)
    batches = gather_batches(data, seed=2)
    assert len(batches[0]) == IOV_MAX
    async with connected(setup) as (client, server):
        received = b""

        async def receiver() -> None:
            nonlocal received
            received = await receive_all(server, len(data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await send_all_then_eof(client, batches)
    assert len(received) == len(data)
    assert received == data


async def test_eof_is_seen_and_stays(setup: Setup) -> None:
    async with connected(setup) as (client, server):
        await client.send_buffers([b"last ", bytearray(b"words"), memoryview(b"!")])
        await client.send_eof()
        assert await receive_all(server, 16) == b"last words!"
        assert await server.receive_into(memoryview(bytearray(8))) == 0


async def test_send_after_eof_is_refused(setup: Setup) -> None:
    async with connected(setup) as (client, server):
        await client.send_eof()
        with pytest.raises(TransportError):
            await client.send_buffers([b"late"])
        assert await receive_all(server, 16) == b""


async def test_empty_send_is_fine(setup: Setup) -> None:
    async with connected(setup) as (client, server):
        await client.send_buffers([])
        await client.send_buffers([b"", memoryview(b"")])
        await client.send_buffers([b"x"])
        await client.send_eof()
        assert await receive_all(server, 4) == b"x"


async def test_return_path_carries_bytes_both_ways_at_once(duplex_setup: Setup) -> None:
    forward = random_bytes(8 << 20, seed=3)
    backward = random_bytes(8 << 20, seed=4)
    results: dict[str, bytes] = {}
    async with connected(duplex_setup) as (client, server):
        assert client.has_return_path and server.has_return_path

        async def read(name: str, stream: ByteStream, size: int) -> None:
            results[name] = await receive_all(stream, size, chunk=100_000)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "at server", server, len(forward))
            nursery.start_soon(read, "at client", client, len(backward))
            nursery.start_soon(send_all_then_eof, client, gather_batches(forward, seed=5))
            nursery.start_soon(send_all_then_eof, server, gather_batches(backward, seed=6))
    assert results["at server"] == forward
    assert results["at client"] == backward


async def test_channel_return_path_over_each_transport(duplex_setup: Setup) -> None:
    async with connected(duplex_setup) as (client, server):
        source, destination = MigrationChannel(client), MigrationChannel(server)
        source.put_be32(0x5145564D)
        await source.flush()
        assert await destination.get_be32() == 0x5145564D
        reply = destination.return_path()
        reply.put_be16(2)
        reply.put_be16(4)
        reply.put_be32(0x42)
        await reply.flush()
        incoming = source.return_path()
        assert (await incoming.get_be16(), await incoming.get_be16()) == (2, 4)
        assert await incoming.get_be32() == 0x42


async def test_exec_has_no_return_path(short_tmp: str) -> None:
    async with connected(make_setup("exec", short_tmp)) as (client, server):
        assert not client.has_return_path and not server.has_return_path
        with pytest.raises(TransportError, match="transport exec has no return path"):
            MigrationChannel(client).return_path()
        with pytest.raises(TransportError, match="transport exec has no return path"):
            MigrationChannel(server).return_path()
        with pytest.raises(TransportError, match="no return path"):
            await client.receive_into(memoryview(bytearray(1)))
        with pytest.raises(TransportError, match="cannot send"):
            await server.send_buffers([b"back"])
        await client.send_eof()


async def test_regions_only_on_rdma(setup: Setup) -> None:
    async with connected(setup) as (client, server):
        if setup.has_regions:
            assert client.regions is not None and server.regions is not None
        else:
            assert client.regions is None and server.regions is None
        await client.send_eof()


class SharedBlock:
    """A memfd of ``pages`` pages and this process's MAP_SHARED mapping of it."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE
        self.fd = os.memfd_create("trimig-test-block", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mapping = mmap.mmap(self.fd, self.size)
        self.buffer = memoryview(self.mapping)

    def close(self) -> None:
        self.buffer.release()
        self.mapping.close()
        os.close(self.fd)


async def test_regions_round_trip_pages(rdma_setup: Setup) -> None:
    block = SharedBlock(64)
    pages = np.frombuffer(random_bytes(16 * PAGE, seed=7), dtype=np.uint8).reshape(16, PAGE)
    written = [3, 0, 17, 63, 40, 41, 42, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    try:
        async with connected(rdma_setup) as (source, destination):
            assert source.regions is not None and destination.regions is not None
            async with trio.open_nursery() as nursery:
                remote: list[memoryview] = []

                async def look_up() -> None:
                    assert source.regions is not None
                    remote.append(await source.regions.remote("pc.ram"))

                nursery.start_soon(look_up)  # waits until the destination registers
                await trio.sleep(0.05)
                assert not remote
                await destination.regions.register("pc.ram", block.fd, block.size, block.buffer)
            target = remote.pop()
            assert target.nbytes == block.size and not target.readonly
            for page, index in zip(pages, written, strict=True):
                target[index * PAGE : (index + 1) * PAGE] = page
            del target
            # The announcement travels on the stream after the one-sided writes.
            await source.send_buffers([b"written"])
            assert await destination.receive_into(memoryview(bytearray(16))) == len(b"written")
            memory = np.frombuffer(block.buffer, dtype=np.uint8).reshape(64, PAGE)
            for page, index in zip(pages, written, strict=True):
                assert np.array_equal(memory[index], page)
            untouched = sorted(set(range(64)) - set(written))
            assert not memory[untouched].any()
            del memory
            await source.send_eof()
    finally:
        block.close()


async def test_remote_region_fails_when_peer_leaves(rdma_setup: Setup) -> None:
    async with connected(rdma_setup) as (source, destination):
        assert source.regions is not None

        async def leave_soon() -> None:
            await trio.sleep(0.05)
            await destination.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_soon)
            with pytest.raises(TransportError, match="peer went away"):
                await source.regions.remote("never")


async def test_connect_to_missing_destination(setup: Setup, short_tmp: str) -> None:
    if setup.name in ("tcp", "tls-tcp"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(TransportError, match="refused"):
            await connect(f"tcp:127.0.0.1:{port}", tls=setup.client_tls)
    elif setup.name in ("unix", "tls-unix"):
        with pytest.raises(TransportError, match="No such file"):
            await connect(f"unix:{short_tmp}/absent", tls=setup.client_tls)
    elif setup.name == "rdma-socket":
        with pytest.raises(TransportError, match="No such file"):
            await connect(f"rdma:{short_tmp}/absent")
    elif setup.name == "rdma-mem":
        with pytest.raises(TransportError, match="nothing listens"):
            await connect("rdma:mem:absent", fabric=MemoryFabric())
    else:
        # exec's "destination" is the command: one that does not exist exits 127.
        stream = await connect(f"exec:{short_tmp}/absent-command")
        try:
            with pytest.raises(TransportError, match="status 127"):
                await stream.send_buffers([bytes(4 << 20)])
                await stream.send_eof()
        finally:
            await stream.aclose()


async def test_cancelled_receive_and_send_leave_no_fd(setup: Setup) -> None:
    before = ResourceSnapshot.take()
    async with connected(setup) as (client, server):
        with trio.move_on_after(0.1) as scope:
            await server.receive_into(memoryview(bytearray(4096)))
        assert scope.cancelled_caught
        chunk = bytes(16 << 20)
        with trio.move_on_after(0.3) as scope:
            await client.send_buffers([chunk] * 32)  # 512 MiB: more than any buffer holds
        assert scope.cancelled_caught
    assert_no_leaks(before)


async def test_aclose_closes_even_when_cancelled(setup: Setup) -> None:
    before = ResourceSnapshot.take()
    async with connected(setup) as (client, server):
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.aclose()
            await server.aclose()
    assert_no_leaks(before)


async def test_aclose_wakes_a_blocked_receive(setup: Setup) -> None:
    async with connected(setup) as (_client, server), trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.sleep(0.05)
            await server.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(TransportError, match="closed locally"):
            await server.receive_into(memoryview(bytearray(64)))
