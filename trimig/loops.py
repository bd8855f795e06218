"""Hot loops: one synchronous step, two thin drivers (a thread driver and a trio driver).

Every latency-critical loop of the engine (the destination's fault handler, postcopy main
listener and urgent-channel reader; the source's return-path reader) is written once, as
a *step*: a plain function that acts on one input (a decoded event, a fault message) and
returns what the loop must send, ``None`` for nothing, or :data:`END` when the loop is
over. A step never waits and never knows which driver calls it.

A *driver* waits for the inputs, calls the step on each, and hands each output to an
``emit`` callback. There are two of each kind, and every loop uses them:

* a decoder's events: :func:`decode_in_thread` (an OS thread run by
  ``threads.run_in_thread``, reading a ``threads.ThreadStream`` through a :data:`Feed`) and
  :func:`decode` (trio, reading a ``MigrationChannel``);
* batches read from a file descriptor when it is readable (the userfaultfd's fault
  messages): :func:`serve_fd_in_thread` and :func:`serve_fd`.

Feeding a decoder has one home per side: :func:`feed_from_stream` (and :class:`StreamFeed`,
which counts) in a thread, reading a ThreadStream (a socket's fd, or TLS decrypted in the
thread) into the decoder's buffer, commit, EOF at a read of 0; :func:`feed_from_channel`
in trio (``MigrationChannel.receive_into_decoder``, EOF when it says so), which
:func:`decode` and :func:`next_event` use.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import trio

from .codec.events import NEED_DATA, NeedData
from .threads import StopSignal, ThreadStream, wait_readable

if TYPE_CHECKING:
    from .channel import MigrationChannel

__all__ = [
    "END",
    "End",
    "Feed",
    "Step",
    "StreamFeed",
    "decode",
    "decode_in_thread",
    "feed_from_channel",
    "feed_from_stream",
    "next_event",
    "serve_fd",
    "serve_fd_in_thread",
]

InputT = TypeVar("InputT")
InputT_contra = TypeVar("InputT_contra", contravariant=True)
OutputT = TypeVar("OutputT")


class End(enum.Enum):
    """The type of :data:`END`."""

    END = "end"


END: Final = End.END
"""What a step returns when its loop is over (the channel's end, SHUT)."""

Step = Callable[[InputT], "OutputT | End | None"]
"""``step(input)``: act on one input; something to emit, None, or END."""


class Decoder(Protocol):
    """The sans-io decoder interface the drivers use (every ``codec`` decoder)."""

    def next_event(self) -> object | NeedData: ...

    def get_buffer(self, min_size: int) -> memoryview: ...

    def commit(self, nbytes: int) -> None: ...

    def receive_eof(self) -> None: ...


Feed = Callable[[Decoder], bool]
"""``feed(decoder)``: give the decoder more input (or its EOF) from a thread, blocking
until some came; False once the thread's StopSignal is set."""


def _drop(output: object) -> None:
    """The default ``emit``: steps that send nothing."""


# -- a decoder's events -------------------------------------------------------------------


def decode_in_thread(
    decoder: Decoder,
    feed: Feed,
    step: Step[object, OutputT],
    emit: Callable[[OutputT], object] = _drop,
) -> bool:
    """Thread driver: act on the decoder's events with ``step`` (``emit`` what it returns),
    feeding the decoder with ``feed``. True once the step returned END, False once
    ``feed`` saw the thread's stop. The decoder's errors propagate."""
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            if not feed(decoder):
                return False
            continue
        output = step(event)
        if output is END:
            return True
        if output is not None:
            emit(output)


async def decode(
    decoder: Decoder,
    channel: MigrationChannel,
    step: Step[object, OutputT],
    emit: Callable[[OutputT], Awaitable[object]] | None = None,
) -> None:
    """Trio driver: act on the decoder's events with ``step`` (``await emit`` of what it
    returns), feeding the decoder from ``channel`` (its EOF too), until the step returns
    END. The decoder's and the channel's errors propagate."""
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            await feed_from_channel(decoder, channel)
            continue
        output = step(event)
        if output is END:
            return
        if output is not None and emit is not None:
            await emit(output)


async def next_event(decoder: Decoder, channel: MigrationChannel) -> object:
    """The decoder's next event, fed from ``channel`` as needed: for a trio loop that
    awaits between events (the precopy loader), where :func:`decode` does not fit."""
    while True:
        event = decoder.next_event()
        if event is not NEED_DATA:
            return event
        await feed_from_channel(decoder, channel)


async def feed_from_channel(decoder: Decoder, channel: MigrationChannel) -> None:
    """One read from ``channel`` straight into ``decoder``, or its EOF: the trio feed."""
    if not await channel.receive_into_decoder(decoder):
        decoder.receive_eof()


def feed_from_stream(
    decoder: Decoder,
    stream: ThreadStream,
    stop: StopSignal,
    *,
    what: str,
    chunk: int,
    timeout: float | None = None,
) -> int | None:
    """One read from ``stream`` straight into ``decoder`` (a read of 0 is its EOF): the
    count, or None once ``stop`` is set. TransportError names ``what``, also after
    ``timeout`` seconds with nothing to read (x-channel-timeout; None: no bound)."""
    buffer = decoder.get_buffer(chunk)
    count = stream.readv_into([buffer], stop, what=what, timeout=timeout)
    if count is None:
        return None
    if count:
        decoder.commit(count)
    else:
        decoder.receive_eof()
    return count


class StreamFeed:
    """A :data:`Feed` over a ThreadStream (:func:`feed_from_stream`), counting the bytes."""

    def __init__(self, stream: ThreadStream, stop: StopSignal, *, what: str, chunk: int) -> None:
        self.stream = stream
        self.stop = stop
        self.what = what
        self.chunk = chunk
        #: Bytes read so far (read from other threads: one int, written by this one).
        self.bytes_received = 0

    def __call__(self, decoder: Decoder) -> bool:
        count = feed_from_stream(decoder, self.stream, self.stop, what=self.what, chunk=self.chunk)
        if count is None:
            return False
        self.bytes_received += count
        return True


# -- batches read from a file descriptor ------------------------------------------------------


def serve_fd_in_thread(
    fd: int,
    read_batch: Callable[[], Iterable[InputT]],
    stop: StopSignal,
    step: Step[InputT, OutputT],
    emit: Callable[[OutputT], object] = _drop,
) -> bool:
    """Thread driver: each time ``fd`` is readable, act with ``step`` on every input that
    ``read_batch`` returns (``emit`` what it returns). True once the step returned END,
    False once ``stop`` is set."""
    while wait_readable([fd], stop) is not None:
        for item in read_batch():
            output = step(item)
            if output is END:
                return True
            if output is not None:
                emit(output)
    return False


async def serve_fd(
    fd: int,
    read_batch: Callable[[], Iterable[InputT]],
    step: Step[InputT, OutputT],
    emit: Callable[[OutputT], Awaitable[object]] | None = None,
) -> None:
    """Trio driver: each time ``fd`` is readable, act with ``step`` on every input that
    ``read_batch`` returns (``await emit`` of what it returns), until the step returns
    END or the task is cancelled."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        for item in read_batch():
            output = step(item)
            if output is END:
                return
            if output is not None and emit is not None:
                await emit(output)
