"""The OS-thread side of every transport (``threads.thread_stream``): what the postcopy
and return-path threads read and write, over real sockets. Sockets give their fd; TLS
gives the thread driver of its session, whose fd carries only ciphertext (the capture
through a proxy at the end)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import trio
from transport_pairs import Setup, connected, make_setup, tls_pair

from trimig.kernel.iov import IoVector
from trimig.threads import StopSignal, ThreadStream, thread_stream
from trimig.transports import ByteStream, connect, listen
from trimig.transports.tls_thread import TlsThreadStream

THREADED = ["tcp", "unix", "tls-tcp", "tls-unix"]
TIMEOUT = 20.0


@pytest.fixture(params=THREADED)
def threaded_setup(request: pytest.FixtureRequest, short_tmp: str) -> Setup:
    return make_setup(request.param, short_tmp)


def read_exactly(stream: ThreadStream, size: int) -> bytes:
    """``size`` bytes read from ``stream`` in this (worker) thread, in odd-sized pieces."""
    buffer = memoryview(bytearray(size))
    stop = StopSignal()
    try:
        have = 0
        while have < size:
            end = min(size, have + 100_003)
            # two pieces per read, as the page scatter does (a word, a page)
            middle = have + (end - have) // 3
            count = stream.readv_into(
                [buffer[have:middle], buffer[middle:end]], stop, what="the test", timeout=TIMEOUT
            )
            assert count, f"the stream ended after {have} of {size} bytes"
            have += count
        return bytes(buffer)
    finally:
        stop.close()


def vector_of(data: bytes) -> tuple[IoVector, np.ndarray]:
    memory = np.frombuffer(data, dtype=np.uint8).copy()
    base = np.uint64(memory.ctypes.data)
    half = len(data) // 2
    entries = np.array([[base, half], [base + np.uint64(half), len(data) - half]], np.uint64)
    return IoVector(entries, (memory,)), memory


async def receive_exactly(stream: ByteStream, size: int) -> bytes:
    buffer = bytearray(size)
    have = 0
    while have < size:
        count = await stream.receive_into(memoryview(buffer)[have:])
        assert count
        have += count
    return bytes(buffer)


async def test_which_transports_have_a_thread_stream(setup: Setup) -> None:
    async with connected(setup) as (client, server):
        for stream in (client, server):
            found = thread_stream(stream)
            if setup.name.startswith("tls"):
                assert isinstance(found, TlsThreadStream)
            elif setup.name in THREADED or found is not None:  # its fd's bytes raw
                assert type(found) is ThreadStream


async def test_threads_and_trio_share_the_stream_both_ways(threaded_setup: Setup) -> None:
    """Trio writes, then a thread (buffers and an IoVector, 3 MiB); a thread reads it all.
    Back the other way: a thread writes and the trio reader reads after a thread read."""
    rng = np.random.default_rng(7)
    first, big, pages = rng.bytes(5000), rng.bytes(3 << 20), rng.bytes(64 * 4096)
    vector, keep = vector_of(pages)
    async with connected(threaded_setup) as (client, server):
        source, destination = thread_stream(client), thread_stream(server)
        assert source is not None and destination is not None
        await client.send_buffers([first])
        views = [memoryview(pages)[i : i + 4096] for i in range(0, len(pages), 4096)]
        items = [big, *views, vector]
        expected = first + big + pages + pages
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync,
                lambda: source.write_all(items, timeout=TIMEOUT, what="the test"),
            )
            got.append(await trio.to_thread.run_sync(read_exactly, destination, len(expected)))
        assert got[0] == expected
        del keep
        answer, later = b"answer" * 1000, b"later" * 20_000
        await server.send_buffers([answer])
        assert await trio.to_thread.run_sync(read_exactly, source, len(answer)) == answer
        written = await trio.to_thread.run_sync(
            lambda: destination.write_all([later], timeout=TIMEOUT, what="the test")
        )
        assert written == len(later)
        assert await receive_exactly(client, len(later)) == later


async def test_a_thread_reads_the_end(threaded_setup: Setup) -> None:
    async with connected(threaded_setup) as (client, server):
        destination = thread_stream(server)
        assert destination is not None
        await client.send_buffers([b"last"])
        await client.send_eof()
        assert await trio.to_thread.run_sync(read_exactly, destination, 4) == b"last"

        def read_end() -> int | None:
            stop = StopSignal()
            try:
                buffer = memoryview(bytearray(16))
                return destination.readv_into([buffer], stop, what="the test", timeout=TIMEOUT)
            finally:
                stop.close()

        assert await trio.to_thread.run_sync(read_end) == 0


async def test_a_thread_read_returns_at_stop(threaded_setup: Setup) -> None:
    async with connected(threaded_setup) as (_, server):
        destination = thread_stream(server)
        assert destination is not None
        stop = StopSignal()
        try:
            stop.set()
            buffer = memoryview(bytearray(16))
            assert destination.readv_into([buffer], stop, what="the test") is None
        finally:
            stop.close()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, kept: bytearray) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(1 << 16):
            kept += data
            await sink.send_all(data)
        await sink.send_eof()


async def test_tls_threads_put_no_plaintext_on_the_wire(short_tmp: str) -> None:
    """A TLS pair through a recording proxy, driven by the thread streams both ways: the
    peer gets the plaintext, the wire never carries it."""
    marker = b"QEVM\0\0\0\3" + bytes(range(256)) * 64
    client_tls, server_tls = tls_pair(short_tmp)
    captured = (bytearray(), bytearray())
    async with await listen("tcp:127.0.0.1:0", tls=server_tls) as listener:
        upstream_port = int(listener.address.uri.rsplit(":", 1)[1])
        proxies = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy_port = proxies[0].socket.getsockname()[1]
        accepted: list[ByteStream] = []
        async with trio.open_nursery() as nursery:

            async def proxy() -> None:
                downstream = await proxies[0].accept()
                upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
                async with downstream, upstream, trio.open_nursery() as pumps:
                    pumps.start_soon(_pump, downstream, upstream, captured[0])
                    pumps.start_soon(_pump, upstream, downstream, captured[1])

            async def accept() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(proxy)
            async with trio.open_nursery() as handshake:
                handshake.start_soon(accept)
                client = await connect(f"tcp:127.0.0.1:{proxy_port}", tls=client_tls)
            server = accepted[0]
            source, destination = thread_stream(client), thread_stream(server)
            assert isinstance(source, TlsThreadStream)
            assert isinstance(destination, TlsThreadStream)
            async with trio.open_nursery() as both:
                both.start_soon(
                    trio.to_thread.run_sync,
                    lambda: source.write_all([marker] * 40, timeout=TIMEOUT, what="the test"),
                )
                received = await trio.to_thread.run_sync(
                    read_exactly, destination, 40 * len(marker)
                )
            assert received == marker * 40
            await trio.to_thread.run_sync(
                lambda: destination.write_all([marker], timeout=TIMEOUT, what="the test")
            )
            assert await trio.to_thread.run_sync(read_exactly, source, len(marker)) == marker
            await client.aclose()
            await server.aclose()
        for kept in captured:
            assert kept[:2] == b"\x16\x03"  # a TLS handshake record
            assert len(kept) > len(marker)
            assert b"QEVM" not in kept and bytes(range(64)) not in kept
        assert len(captured[0]) > 40 * len(marker)
        for each in proxies:
            await each.aclose()
