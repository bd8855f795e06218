"""MigrationChannel: QEMUFile-like buffered reading and writing over a ByteStream.

Write side: ``put*`` calls queue bytes (small ones copied into a scratch buffer, page
payloads from ``put_buffers`` and gather arrays from ``put_vector`` kept as zero-copy
views) until ``await flush()`` hands the
whole queue to the stream in one gather write. Read side: an internal buffer serves
``get_exactly``/``get_be*``, and ``receive_into_decoder`` feeds a sans-io decoder straight
from the stream. ``return_path()`` is a second channel on the same stream for the reverse
direction. Also here: ``RateLimiter``, precopy's bandwidth limit in 100 ms windows.

The channel never interprets the bytes; that is the codec's job.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Protocol

import trio

from trimig.errors import ConfigError, LocalProtocolError, TransportError
from trimig.kernel.iov import Buffer, GatherItem, IoVector, byte_buffers
from trimig.transports.base import ByteStream

__all__ = [
    "BUFFER_DELAY",
    "BufferedDecoder",
    "ByteStream",
    "MigrationChannel",
    "RateLimiter",
]

READ_CHUNK = 2 * 1024 * 1024
"""Bytes asked of the stream per read (the decoder's minimum buffer, the internal buffer).

Large, so that a read carries runs of hundreds of pages: the destination's Python work is
per read and per run, not per page (256 KiB reads cost it a quarter more CPU per GiB)."""

BUFFER_DELAY = 0.1
"""Length in seconds of a rate-limiting window (QEMU's BUFFER_DELAY, 100 ms)."""


class BufferedDecoder(Protocol):
    """The zero-copy input side of a sans-io decoder (the codec's StreamDecoder)."""

    def get_buffer(self, min_size: int) -> memoryview:
        """A writable view of at least ``min_size`` free bytes at the end of its input."""
        ...

    def commit(self, count: int) -> None:
        """``count`` bytes were written at the start of the last get_buffer() view."""
        ...


class MigrationChannel:
    """A buffered channel over ``stream``; the channel made by the caller owns the stream.

    Writing and reading are independent; one task at a time may read. Concurrent flushes
    are serialised, each sending what was queued before it started. A send that fails or is
    cancelled leaves the stream at an unknown position: later flushes then raise
    TransportError.
    """

    def __init__(
        self, stream: ByteStream, *, read_chunk: int = READ_CHUNK, _owner: bool = True
    ) -> None:
        if read_chunk <= 0:
            raise ConfigError(f"read_chunk must be positive, not {read_chunk}")
        self._stream = stream
        self._owner = _owner
        self._closed = False
        self._reverse: MigrationChannel | None = None
        # write side
        self._pending: list[GatherItem] = []
        self._scratch = bytearray()
        self._pending_bytes = 0
        self._bytes_sent = 0
        #: Flushes that took the queue so far, and the number of the last one that ended
        #: with everything it took written (flushes run one at a time, in order).
        self._flushes_taken = 0
        self._flushes_written = 0
        self._send_lock = trio.Lock()
        self._broken: BaseException | None = None
        # read side
        self._read_chunk = read_chunk
        self._buffer = bytearray(read_chunk)
        self._start = 0
        self._end = 0
        self._eof = False
        self._reading = False
        self._bytes_received = 0
        #: Dead-peer detection of the reader (x-channel-timeout): a read that gets no byte
        #: for this many seconds raises TransportError. None: reads wait as long as it takes
        #: (a return path, quiet while nothing is asked).
        self.receive_timeout: float | None = None

    @property
    def stream(self) -> ByteStream:
        """The underlying ByteStream (e.g. for ``.regions`` on the RDMA-shaped transport)."""
        return self._stream

    # -- write side ------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Bytes handed to the stream by completed flushes."""
        return self._bytes_sent

    @property
    def pending_bytes(self) -> int:
        """Bytes queued by put*() and not flushed yet."""
        return self._pending_bytes

    def put(self, data: Buffer) -> None:
        """Queue a copy of ``data``."""
        before = len(self._scratch)
        self._scratch += data
        self._pending_bytes += len(self._scratch) - before

    def put_be8(self, value: int) -> None:
        self.put(_encode(value, 1))

    def put_be16(self, value: int) -> None:
        self.put(_encode(value, 2))

    def put_be32(self, value: int) -> None:
        self.put(_encode(value, 4))

    def put_be64(self, value: int) -> None:
        self.put(_encode(value, 8))

    def put_counted_string(self, text: str | bytes) -> None:
        """Queue ``u8 length`` then the bytes (UTF-8 for str); at most 255 bytes."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if len(data) > 255:
            raise LocalProtocolError(
                f"counted string {data[:32]!r}... is {len(data)} bytes; the limit is 255"
            )
        self.put(bytes((len(data),)) + data)

    def put_buffers(self, buffers: Iterable[Buffer]) -> None:
        """Queue ``buffers`` without copying; they must stay unchanged until flush() returns.
        On a channel an earlier send broke, drops them (the next flush raises)."""
        if self._broken is not None:
            return
        views, lengths = byte_buffers(list(buffers))
        if not views:
            return
        self._seal_scratch()
        self._pending.extend(views)
        self._pending_bytes += sum(lengths)

    @property
    def next_flush(self) -> int:
        """The number of the flush that will write what is queued now: memory queued with
        put_vector() may change again once ``written_flushes`` reaches it."""
        return self._flushes_taken + 1

    @property
    def written_flushes(self) -> int:
        """The number of the last flush whose data is all written."""
        return self._flushes_written

    def put_vector(self, vector: IoVector) -> None:
        """Queue a gather array without copying; its memory must stay unchanged until flush().
        On a channel an earlier send broke, drops it (the next flush raises)."""
        if not vector.nbytes or self._broken is not None:
            return
        self._seal_scratch()
        self._pending.append(vector)
        self._pending_bytes += vector.nbytes

    def _seal_scratch(self) -> None:
        if self._scratch:
            self._pending.append(self._scratch)
            self._scratch = bytearray()

    async def flush(self) -> None:
        """Send everything queued so far in one gather write."""
        self._check_open()
        async with self._send_lock:
            if self._broken is not None:
                self._pending, self._scratch, self._pending_bytes = [], bytearray(), 0
                raise TransportError(
                    "the channel is unusable: an earlier send on it failed or was cancelled"
                ) from self._broken
            self._seal_scratch()
            buffers, self._pending = self._pending, []
            count, self._pending_bytes = self._pending_bytes, 0
            self._flushes_taken += 1
            flush = self._flushes_taken
            if not buffers:
                self._flushes_written = flush
                await trio.lowlevel.checkpoint()
                return
            try:
                await self._stream.send_buffers(buffers)
            except BaseException as error:
                self._broken = error
                _drop_views(buffers, error)
                raise
            self._bytes_sent += count
            self._flushes_written = flush

    async def send_eof(self) -> None:
        """Flush, then tell the peer nothing more follows (for exec: wait for the command)."""
        await self.flush()
        await self._stream.send_eof()

    # -- read side -------------------------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """Bytes read from the stream (including those still in the internal buffer)."""
        return self._bytes_received

    @property
    def buffered(self) -> int:
        """Bytes read from the stream into the internal buffer and not handed out yet.
        A reader that takes over the stream's file descriptor needs this to be 0."""
        return self._end - self._start

    async def _receive(self, target: memoryview) -> int:
        if self.receive_timeout is None:
            count = await self._stream.receive_into(target)
        else:
            with trio.move_on_after(self.receive_timeout) as bound:
                count = await self._stream.receive_into(target)
            if bound.cancelled_caught:
                raise TransportError(
                    f"nothing received from the peer for {self.receive_timeout:g} s "
                    "(x-channel-timeout)"
                )
        if count == 0:
            self._eof = True
        self._bytes_received += count
        return count

    def _begin_read(self) -> None:
        self._check_open()
        if self._reading:
            raise trio.BusyResourceError("another task is already reading this channel")
        self._reading = True

    async def get_exactly(self, count: int) -> bytes:
        """The next ``count`` bytes; TransportError if the stream ends first."""
        if count < 0:
            raise LocalProtocolError(f"get_exactly({count}): negative length")
        self._begin_read()
        try:
            available = self._end - self._start
            if available >= count:
                await trio.lowlevel.checkpoint()
                return self._take(count)
            if count > len(self._buffer):
                return await self._get_large(count)
            if self._start:
                self._buffer[:available] = self._buffer[self._start : self._end]
                self._start, self._end = 0, available
            view = memoryview(self._buffer)
            while self._end < count:
                received = 0 if self._eof else await self._receive(view[self._end :])
                if received == 0:
                    self._raise_truncated(count, self._end)
                self._end += received
            return self._take(count)
        finally:
            self._reading = False

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[self._start : self._start + count])
        self._start += count
        if self._start == self._end:
            self._start = self._end = 0
        return data

    async def _get_large(self, count: int) -> bytes:
        result = bytearray(count)
        have = self._end - self._start
        result[:have] = self._buffer[self._start : self._end]
        self._start = self._end = 0
        view = memoryview(result)
        while have < count:
            received = 0 if self._eof else await self._receive(view[have:])
            if received == 0:
                self._raise_truncated(count, have)
            have += received
        return bytes(result)

    def _raise_truncated(self, wanted: int, have: int) -> None:
        raise TransportError(
            f"the stream ended after {self._bytes_received} bytes, {wanted - have} bytes short "
            f"of a {wanted}-byte read"
        )

    async def get_be8(self) -> int:
        return int.from_bytes(await self.get_exactly(1), "big")

    async def get_be16(self) -> int:
        return int.from_bytes(await self.get_exactly(2), "big")

    async def get_be32(self) -> int:
        return int.from_bytes(await self.get_exactly(4), "big")

    async def get_be64(self) -> int:
        return int.from_bytes(await self.get_exactly(8), "big")

    async def get_counted_string(self) -> bytes:
        """A ``u8 length`` then that many bytes."""
        return await self.get_exactly(await self.get_be8())

    async def receive_into_decoder(self, decoder: BufferedDecoder) -> bool:
        """Give ``decoder`` more input; False at EOF (the caller then calls its receive_eof).

        Bytes still in the channel's own buffer are handed over first; otherwise one read
        from the stream goes straight into the decoder's buffer.
        """
        self._begin_read()
        try:
            available = self._end - self._start
            if available:
                target = memoryview(decoder.get_buffer(available))
                target[:available] = self._buffer[self._start : self._end]
                self._start = self._end = 0
                decoder.commit(available)
                await trio.lowlevel.checkpoint()
                return True
            if self._eof:
                await trio.lowlevel.checkpoint()
                return False
            received = await self._receive(memoryview(decoder.get_buffer(self._read_chunk)))
            if received == 0:
                return False
            decoder.commit(received)
            return True
        finally:
            self._reading = False

    fill = receive_into_decoder
    """Alias of receive_into_decoder (the name docs/design.md uses)."""

    # -- both ------------------------------------------------------------------------------

    def return_path(self) -> MigrationChannel:
        """The channel for the reverse direction of the same stream (one per channel).

        Raises TransportError for a transport without a return path (exec). The returned
        channel does not own the stream: its aclose() leaves the stream open.
        """
        if not self._stream.has_return_path:
            raise TransportError(f"transport {self._stream.transport} has no return path")
        if self._reverse is None:
            self._reverse = MigrationChannel(
                self._stream, read_chunk=self._read_chunk, _owner=False
            )
            self._reverse._reverse = self
        return self._reverse

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the channel is closed")

    async def aclose(self) -> None:
        """Close; drops unflushed data. Closes the stream if this channel owns it."""
        self._closed = True
        self._pending, self._scratch, self._pending_bytes = [], bytearray(), 0
        if self._owner:
            await self._stream.aclose()
        else:
            await trio.lowlevel.checkpoint()


def _drop_views(buffers: list[GatherItem], error: BaseException) -> None:
    """Let go of a failed send's buffers: views of guest memory among them would keep its
    mapping exported (BufferError on unmapping it) for as long as ``error`` lives, held by
    the list and by the locals of the frames in its traceback and in its causes'."""
    buffers.clear()
    cause: BaseException | None = error
    while cause is not None:
        traceback.clear_frames(cause.__traceback__)  # skips the frame still running: ours
        cause = cause.__cause__


def _encode(value: int, size: int) -> bytes:
    try:
        return value.to_bytes(size, "big")
    except OverflowError:
        raise LocalProtocolError(
            f"value {value} does not fit an unsigned {8 * size}-bit field"
        ) from None


class RateLimiter:
    """Limits a sender to ``bytes_per_second`` in 100 ms windows (QEMU's BUFFER_DELAY).

    After sending, ``await wait(nbytes)``: once the current window's budget (a tenth of the
    rate) is used up it sleeps until a window with budget left begins. Bytes over budget
    carry into the next windows, so large writes still average out to the rate; an idle
    window does not save up budget. ``set_rate`` takes effect within one window;
    0 means unlimited.
    """

    def __init__(self, bytes_per_second: int = 0) -> None:
        self._rate = 0
        self.set_rate(bytes_per_second)
        self._window_end: float | None = None
        self._used = 0.0

    @property
    def rate(self) -> int:
        """The limit in bytes per second; 0 means unlimited."""
        return self._rate

    @rate.setter
    def rate(self, bytes_per_second: int) -> None:
        self.set_rate(bytes_per_second)

    def set_rate(self, bytes_per_second: int) -> None:
        if isinstance(bytes_per_second, bool) or not isinstance(bytes_per_second, int):
            raise ConfigError(f"rate limit must be an integer, not {bytes_per_second!r}")
        if bytes_per_second < 0:
            raise ConfigError(f"rate limit must not be negative, not {bytes_per_second}")
        self._rate = bytes_per_second

    def _roll(self, now: float) -> None:
        """Move to the window holding ``now``, paying the debt of each window that ended."""
        if self._window_end is None:
            self._window_end = now + BUFFER_DELAY
            return
        if now >= self._window_end:
            ended = int((now - self._window_end) / BUFFER_DELAY) + 1
            self._window_end += ended * BUFFER_DELAY
            self._used = max(0.0, self._used - ended * self._rate * BUFFER_DELAY)

    async def wait(self, nbytes: int) -> None:
        """Account ``nbytes`` just sent; sleep while the budget is exhausted."""
        if nbytes < 0:
            raise LocalProtocolError(f"RateLimiter.wait({nbytes}): negative byte count")
        if self._rate == 0:
            self._window_end = None
            self._used = 0.0
            await trio.lowlevel.checkpoint()
            return
        self._roll(trio.current_time())
        self._used += nbytes
        slept = False
        while self._rate and self._used >= self._rate * BUFFER_DELAY:
            assert self._window_end is not None
            await trio.sleep_until(self._window_end)
            slept = True
            self._roll(trio.current_time())
        if not self._rate:
            self._used = 0.0
        if not slept:
            await trio.lowlevel.checkpoint()
