"""The contracts every transport meets (ByteStream, Listener, RegionRegistry) and shared helpers.

A transport moves bytes and knows nothing of the migration stream format. Errors of the
link (refused, reset, broken pipe, a child that failed) are raised as TransportError.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

import trio

from trimig.errors import LocalProtocolError, TransportError
from trimig.kernel.iov import Buffer as Buffer  # the buffer type of the transports' API
from trimig.kernel.iov import GatherItem, GatherWrite
from trimig.transports.uri import Address


class RegionRegistry(Protocol):
    """One-sided memory of the RDMA-shaped transport.

    The destination registers its RAM blocks; the source gets a writable view of each and
    writes pages straight into the destination's memory, then announces them on the stream.
    """

    async def register(self, name: str, fd: int, size: int, buffer: memoryview) -> None:
        """Offer ``size`` bytes of memory under ``name`` to the peer.

        ``fd`` (a memfd holding the memory from offset 0) is what crosses a process
        boundary; ``buffer`` (this process's writable mapping of it, ``size`` bytes) is what
        the in-process flavour hands out. Names are unique per stream.
        """
        ...

    async def remote(self, name: str) -> memoryview:
        """A writable view of the peer's region ``name``, waiting until it is registered.

        Raises TransportError if the peer goes away (or the stream closes) first.
        """
        ...


MAX_REGION_NAME = 255
"""Longest region name, in bytes of UTF-8."""


def check_registration(name: str, size: int, buffer: memoryview) -> bytes:
    """Refuse a registration that breaks RegionRegistry.register's contract; the encoded name."""
    encoded = name.encode()
    if not 1 <= len(encoded) <= MAX_REGION_NAME:
        raise LocalProtocolError(
            f"region name {name!r} must be 1-{MAX_REGION_NAME} bytes of UTF-8, not {len(encoded)}"
        )
    if size <= 0:
        raise LocalProtocolError(f"region {name!r} has size {size}; it must be positive")
    view = memoryview(buffer)
    if view.readonly:
        raise LocalProtocolError(f"the buffer of region {name!r} is read-only")
    if view.nbytes != size:
        raise LocalProtocolError(
            f"the buffer of region {name!r} has {view.nbytes} bytes but its size is {size}"
        )
    return encoded


class ByteStream(Protocol):
    """A bidirectional (or one-way, for exec) byte pipe between the two engines."""

    @property
    def transport(self) -> str:
        """The transport's name: "tcp", "unix", "exec" or "rdma"."""
        ...

    @property
    def has_return_path(self) -> bool:
        """Whether the reverse direction exists (and can carry the return path)."""
        ...

    @property
    def regions(self) -> RegionRegistry | None:
        """The one-sided memory registry; None except on the RDMA-shaped transport."""
        ...

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        """Gather-write every byte of ``buffers`` in order (one writev per batch).

        Items are buffers or :class:`~trimig.kernel.iov.IoVector` gather arrays. The
        bytes are not copied and must not change until this returns. If cancelled, an
        unknown prefix may have been sent: the stream is then only good for aclose().
        """
        ...

    async def receive_into(self, buffer: memoryview) -> int:
        """Read at least one byte into ``buffer`` (non-empty); return the count, 0 at EOF."""
        ...

    async def send_eof(self) -> None:
        """Tell the peer no more bytes follow (half close); receiving still works."""
        ...

    async def aclose(self) -> None:
        """Close the stream and release every resource; closes fds even when cancelled."""
        ...


class Listener(Protocol):
    """An incoming endpoint; ``address`` is the real one (the bound port for ``tcp:...:0``)."""

    @property
    def address(self) -> Address: ...

    async def accept(self) -> ByteStream:
        """Wait for the next incoming connection (or, for exec, start the command)."""
        ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class ListenerBase:
    """Gives a listener ``async with`` support on top of its aclose()."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class StalledError(Exception):
    """A write waited ``seconds`` without the peer taking a byte (see write_gather)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the peer took nothing for {seconds:g} s")
        self.seconds = seconds


async def write_gather(
    fd: int, items: Sequence[GatherItem], *, stall_timeout: float | None = None
) -> int:
    """Write every byte of ``items`` to the non-blocking ``fd``; return the count.

    The trio driver of :class:`~trimig.kernel.iov.GatherWrite`: waits for ``fd`` to become
    writable whenever the kernel buffer is full. Raises OSError (EPIPE, ECONNRESET, ...) as
    os.writev would, and StalledError when one wait for room lasts ``stall_timeout``
    seconds (the peer takes nothing: each byte it takes restarts the bound). Cancelled (or
    stalled) while waiting, an unknown prefix has been written. Not a checkpoint by itself
    when nothing blocks.
    """
    gather = GatherWrite(items)
    while not gather.write(fd):
        if stall_timeout is None:
            await trio.lowlevel.wait_writable(fd)
            continue
        with trio.move_on_after(stall_timeout) as bound:
            await trio.lowlevel.wait_writable(fd)
        if bound.cancelled_caught:
            raise StalledError(stall_timeout)
    return gather.total


def set_channel_timeout(stream: object, seconds: float | None) -> bool:
    """Give ``stream`` dead-peer detection (x-channel-timeout) if its transport has it
    (socket streams: a stalled send fails, tcp keepalive and TCP_USER_TIMEOUT); whether it
    has. Reads are bounded by their reader (MigrationChannel.receive_timeout)."""
    setter = getattr(stream, "set_channel_timeout", None)
    if not callable(setter):
        return False
    setter(seconds)
    return True


def shutdown_stream(stream: object) -> None:
    """Shut both directions of ``stream`` down now, from any task (QEMU's migrate-pause):
    its readers see the end, its writers fail; closing is still its owner's job. A
    stream without ``shutdown`` is left alone (only socket streams are paused this way)."""
    shutdown = getattr(stream, "shutdown", None)
    if callable(shutdown):
        shutdown()


def check_receive_buffer(buffer: memoryview) -> None:
    """Refuse an empty receive buffer: a 0 return must only ever mean EOF."""
    if memoryview(buffer).nbytes == 0:
        raise LocalProtocolError("receive_into needs a non-empty buffer (0 means EOF)")


_EXPLANATIONS = {
    errno.EPIPE: "the peer closed the connection",
    errno.ECONNRESET: "the peer reset the connection",
    errno.ECONNREFUSED: "nothing is listening there",
    errno.ENOENT: "no such socket",
    errno.ETIMEDOUT: "the connection timed out",
}


def transport_error(action: str, error: BaseException) -> TransportError:
    """A TransportError for ``action`` (e.g. "sending on tcp:h:1") failing with ``error``."""
    if isinstance(error, trio.ClosedResourceError) or (
        isinstance(error, OSError) and error.errno == errno.EBADF
    ):
        return TransportError(f"{action} failed: the stream was closed locally")
    if isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno)
        explanation = _EXPLANATIONS.get(error.errno)
        if explanation:
            reason += f" ({explanation})"
        return TransportError(f"{action} failed: {reason}")
    return TransportError(f"{action} failed: {error}")
