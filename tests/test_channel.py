"""MigrationChannel over real socket pairs, and the RateLimiter on a virtual clock."""

from __future__ import annotations

import mmap
import struct
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import trio

from trimig.channel import BUFFER_DELAY, MigrationChannel, RateLimiter
from trimig.errors import ConfigError, LocalProtocolError, TransportError
from trimig.transports import Buffer, SocketStream


@pytest.fixture
async def pair() -> AsyncIterator[tuple[MigrationChannel, MigrationChannel]]:
    """(source, destination) channels over a connected unix socketpair."""
    left, right = trio.socket.socketpair()
    source = MigrationChannel(SocketStream(left, transport="unix", peer="left"))
    destination = MigrationChannel(SocketStream(right, transport="unix", peer="right"))
    try:
        yield source, destination
    finally:
        await source.aclose()
        await destination.aclose()


class RecordingStream:
    """Records what the channel hands to send_buffers (a logic-test stand-in)."""

    transport = "recording"
    has_return_path = True
    regions = None

    def __init__(self) -> None:
        self.sends: list[list[Buffer]] = []
        self.block: trio.Event | None = None

    async def send_buffers(self, buffers: Sequence[Buffer]) -> None:
        self.sends.append(list(buffers))
        if self.block is not None:
            await self.block.wait()
        await trio.lowlevel.checkpoint()

    async def receive_into(self, buffer: memoryview) -> int:
        await trio.sleep_forever()
        raise AssertionError

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class ByteSink:
    """A minimal get_buffer/commit decoder input that keeps everything it was given."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.requested: list[int] = []
        self._buffer = bytearray()

    def get_buffer(self, min_size: int) -> memoryview:
        self.requested.append(min_size)
        self._buffer = bytearray(min_size + 7)
        return memoryview(self._buffer)

    def commit(self, count: int) -> None:
        self.data += self._buffer[:count]


async def test_typed_puts_and_gets_round_trip(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    source.put(b"QEVM")
    source.put_be8(0xFE)
    source.put_be16(0xBEEF)
    source.put_be32(0xDEADBEEF)
    source.put_be64(0x0123456789ABCDEF)
    source.put_counted_string("pc.ram")
    source.put_counted_string(b"\xff" * 255)
    source.put_counted_string("")
    expected = 4 + 1 + 2 + 4 + 8 + 7 + 256 + 1
    assert source.pending_bytes == expected and source.bytes_sent == 0
    await source.flush()
    assert source.pending_bytes == 0 and source.bytes_sent == expected
    assert await destination.get_exactly(4) == b"QEVM"
    assert await destination.get_be8() == 0xFE
    assert await destination.get_be16() == 0xBEEF
    assert await destination.get_be32() == 0xDEADBEEF
    assert await destination.get_be64() == 0x0123456789ABCDEF
    assert await destination.get_counted_string() == b"pc.ram"
    assert await destination.get_counted_string() == b"\xff" * 255
    assert await destination.get_counted_string() == b""
    assert destination.bytes_received == expected


def test_put_refuses_what_does_not_fit() -> None:
    channel = MigrationChannel(RecordingStream())
    with pytest.raises(LocalProtocolError, match="256 bytes; the limit is 255"):
        channel.put_counted_string("x" * 256)
    with pytest.raises(LocalProtocolError, match="unsigned 8-bit"):
        channel.put_be8(256)
    with pytest.raises(LocalProtocolError, match="unsigned 16-bit"):
        channel.put_be16(-1)
    with pytest.raises(LocalProtocolError, match="unsigned 64-bit"):
        channel.put_be64(1 << 64)
    assert channel.pending_bytes == 0


async def test_flush_is_one_gather_with_page_payloads_uncopied() -> None:
    stream = RecordingStream()
    channel = MigrationChannel(stream)
    pages = np.arange(4 * 4096, dtype=np.uint8).reshape(4, 4096)
    for index, page in enumerate(pages):
        channel.put_be64(index * 4096 | 0x08)
        channel.put_buffers([page])
    channel.put_be64(0x10)
    await channel.flush()
    assert len(stream.sends) == 1
    (sent,) = stream.sends
    assert len(sent) == 9  # header, page, header, page, ..., EOS
    for index in range(4):
        payload = sent[2 * index + 1]
        assert isinstance(payload, memoryview)
        assert np.shares_memory(np.frombuffer(payload, dtype=np.uint8), pages[index])
        assert bytes(sent[2 * index]) == struct.pack(">Q", index * 4096 | 0x08)
    assert bytes(sent[8]) == struct.pack(">Q", 0x10)
    assert channel.bytes_sent == 4 * 8 + 4 * 4096 + 8


async def test_put_buffers_sends_the_memory_as_it_is_at_flush(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    page = bytearray(b"a" * 4096)
    source.put_buffers([page])
    page[:4] = b"zzzz"  # zero-copy: the change before flush is what goes out
    await source.flush()
    assert await destination.get_exactly(4096) == b"zzzz" + b"a" * 4092


async def test_empty_flush_sends_nothing() -> None:
    stream = RecordingStream()
    channel = MigrationChannel(stream)
    await channel.flush()
    channel.put_buffers([b"", memoryview(b"")])
    await channel.flush()
    assert stream.sends == []


async def test_concurrent_flushes_keep_each_message_whole() -> None:
    stream = RecordingStream()
    stream.block = trio.Event()
    channel = MigrationChannel(stream)
    async with trio.open_nursery() as nursery:
        channel.put(b"first message")
        nursery.start_soon(channel.flush)
        await trio.testing.wait_all_tasks_blocked()
        channel.put(b"second message")  # queued while the first flush is in progress
        nursery.start_soon(channel.flush)
        await trio.testing.wait_all_tasks_blocked()
        assert len(stream.sends) == 1
        stream.block.set()
    assert [b"".join(bytes(b) for b in sent) for sent in stream.sends] == [
        b"first message",
        b"second message",
    ]


async def test_cancelled_flush_breaks_the_channel() -> None:
    stream = RecordingStream()
    stream.block = trio.Event()
    channel = MigrationChannel(stream)
    channel.put(b"data")
    with trio.move_on_after(0.01):
        await channel.flush()
    channel.put(b"more")
    with pytest.raises(TransportError, match="earlier send on it failed or was cancelled"):
        await channel.flush()


async def test_a_failed_send_lets_go_of_the_memory_it_was_sending() -> None:
    # Page payloads are views of the guest's mapping; the failed send's error (kept by the
    # channel and by whoever reports it) must not keep that mapping exported, or closing
    # the block raises BufferError (seen after a postcopy cut).
    left, right = trio.socket.socketpair()
    right.close()
    channel = MigrationChannel(SocketStream(left, transport="unix", peer="left"))
    memory = mmap.mmap(-1, 4 * 4096)
    view = memoryview(memory)
    channel.put(b"header")
    channel.put_buffers([view[i : i + 4096] for i in range(0, len(view), 4096)])
    with pytest.raises(TransportError) as failed:
        await channel.flush()
    channel.put_buffers([view[:4096]])  # queued on a broken channel: dropped
    view.release()
    memory.close()  # BufferError if any slice is still alive
    with pytest.raises(TransportError, match="earlier send on it failed"):
        await channel.flush()
    assert failed.value is not None
    await channel.aclose()


async def test_get_exactly_larger_than_the_buffer(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    blob = np.random.default_rng(1).bytes(3 << 20)
    source.put_be32(len(blob))
    source.put_buffers([blob])
    source.put_be8(7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.flush)
        size = await destination.get_be32()
        assert await destination.get_exactly(size) == blob
        assert await destination.get_be8() == 7


async def test_get_exactly_at_eof_is_a_transport_error(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    source.put(b"abc")
    await source.send_eof()
    assert await destination.get_exactly(2) == b"ab"
    with pytest.raises(TransportError, match="ended after 3 bytes, 3 bytes short of a 4-byte read"):
        await destination.get_exactly(4)


async def test_decoder_gets_buffered_bytes_first_then_the_stream(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    data = np.random.default_rng(2).bytes(1 << 20)
    source.put(data)
    sink = ByteSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.send_eof)
        assert await destination.get_exactly(3) == data[:3]  # the channel buffered more
        while await destination.receive_into_decoder(sink):
            pass
    assert bytes(sink.data) == data[3:]
    assert sink.requested[0] < len(data)  # the first call handed over the buffered rest
    assert await destination.fill(sink) is False  # EOF stays EOF
    assert destination.bytes_received == len(data)


async def test_one_reader_at_a_time(pair: tuple[MigrationChannel, MigrationChannel]) -> None:
    _, destination = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination.get_be8)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await destination.get_be8()
        nursery.cancel_scope.cancel()


async def test_return_path_shares_the_stream(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, destination = pair
    reply = destination.return_path()
    assert destination.return_path() is reply
    assert reply.return_path() is destination
    reply.put_be16(2)
    reply.put_be16(4)
    reply.put_be32(1)
    await reply.flush()
    incoming = source.return_path()
    assert [await incoming.get_be16(), await incoming.get_be16()] == [2, 4]
    assert await incoming.get_be32() == 1
    await reply.aclose()  # not the owner: the stream stays open
    source.put(b"still open")
    await source.flush()
    assert await destination.get_exactly(10) == b"still open"


async def test_closed_channel_refuses_work(
    pair: tuple[MigrationChannel, MigrationChannel],
) -> None:
    source, _ = pair
    source.put(b"dropped")
    await source.aclose()
    with pytest.raises(TransportError, match="closed"):
        await source.flush()
    with pytest.raises(TransportError, match="closed"):
        await source.get_be8()


# -- RateLimiter (virtual time) -----------------------------------------------------------


async def send_at_rate(limiter: RateLimiter, chunks: int, size: int) -> float:
    start = trio.current_time()
    for _ in range(chunks):
        await limiter.wait(size)
    return trio.current_time() - start


async def test_rate_limit_is_kept(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(10_000_000)
    elapsed = await send_at_rate(limiter, 100, 100_000)  # 10 MB at 10 MB/s
    assert 0.9 <= elapsed <= 1.0 + BUFFER_DELAY


async def test_large_writes_carry_over(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(1_000_000)
    elapsed = await send_at_rate(limiter, 4, 1 << 20)  # each write is 10 windows' budget
    assert 4 * (1 << 20) / 1_000_000 - 2 * BUFFER_DELAY <= elapsed <= 4.2 + BUFFER_DELAY


async def test_unlimited_takes_no_time(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(0)
    assert await send_at_rate(limiter, 1000, 1 << 30) == 0


async def test_rate_changes_at_runtime(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(1_000_000)
    slow = await send_at_rate(limiter, 10, 100_000)  # 1 MB at 1 MB/s
    limiter.set_rate(10_000_000)
    fast = await send_at_rate(limiter, 10, 100_000)  # 1 MB at 10 MB/s
    limiter.rate = 0
    free = await send_at_rate(limiter, 10, 100_000)
    assert 0.8 <= slow <= 1.1
    assert fast <= 0.2
    assert free == 0
    assert limiter.rate == 0


async def test_a_waiting_sender_sees_the_new_rate(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(1_000)  # 100 bytes per window
    async with trio.open_nursery() as nursery:

        async def unlimit_soon() -> None:
            await trio.sleep(0.25)
            limiter.set_rate(0)

        nursery.start_soon(unlimit_soon)
        start = trio.current_time()
        await limiter.wait(1_000_000)  # would take 1000 s at the old rate
        assert trio.current_time() - start <= 0.25 + BUFFER_DELAY


def test_bad_rates() -> None:
    with pytest.raises(ConfigError, match="must not be negative"):
        RateLimiter(-1)
    with pytest.raises(ConfigError, match="must be an integer"):
        RateLimiter(1.5)  # type: ignore[arg-type]
