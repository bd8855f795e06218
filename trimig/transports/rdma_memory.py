"""The in-process RDMA-shaped transport, ``rdma:mem:NAME``.

Both ends live in one trio run and meet through a ``MemoryFabric`` passed explicitly to
``listen``/``connect``. The message queue is a pair of trio memory channels carrying
``bytes``; ``remote(name)`` returns a view of the very buffer the peer registered. (The
cross-process flavour, ``rdma:PATH``, is ``rdma_socket.py``; ``RegionRegistry`` in
``base.py`` describes what both offer.)
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from trimig.errors import LocalProtocolError, TransportError
from trimig.kernel.iov import Buffer, GatherItem, byte_buffers, flatten
from trimig.transports.base import (
    ListenerBase,
    check_receive_buffer,
    check_registration,
    transport_error,
)
from trimig.transports.socket import LISTEN_BACKLOG
from trimig.transports.uri import RdmaMemoryAddress

MESSAGE_SIZE = 1024 * 1024
"""send_buffers() joins buffers into messages of about this size."""

QUEUE_MESSAGES = 16
"""Messages in flight per direction before send_buffers() waits."""


def _writable_bytes(buffer: memoryview) -> memoryview:
    view = memoryview(buffer)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


class _RegionBoard:
    """The regions one endpoint published, watched by the other endpoint."""

    def __init__(self) -> None:
        self.regions: dict[str, memoryview] = {}
        self.closed = False
        self._changed = trio.Event()

    def publish(self, name: str, buffer: memoryview) -> None:
        self.regions[name] = buffer
        self.notify()

    def close(self) -> None:
        """No more lookups: drop (and release) our references to the published buffers."""
        self.closed = True
        for buffer in self.regions.values():
            buffer.release()
        self.regions.clear()
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class MemoryRegions:
    """RegionRegistry of an in-process endpoint: remote() hands out the peer's own buffer."""

    def __init__(self, local: _RegionBoard, peer: _RegionBoard, uri: str) -> None:
        self._local = local
        self._peer = peer
        self._uri = uri

    async def register(self, name: str, fd: int, size: int, buffer: memoryview) -> None:
        """Publish ``buffer`` under ``name``; ``fd`` is not used in process."""
        check_registration(name, size, buffer)
        await trio.lowlevel.checkpoint()
        if self._local.closed:
            raise TransportError(f"registering region {name!r} on {self._uri}: stream is closed")
        if name in self._local.regions:
            raise LocalProtocolError(f"region {name!r} is already registered on {self._uri}")
        self._local.publish(name, _writable_bytes(buffer))

    async def remote(self, name: str) -> memoryview:
        await trio.lowlevel.checkpoint()
        while True:
            if self._local.closed:
                raise TransportError(f"region {name!r} of {self._uri}: the stream is closed")
            region = self._peer.regions.get(name)
            if region is not None:
                return memoryview(region)
            if self._peer.closed:
                raise TransportError(
                    f"region {name!r} of {self._uri}: the peer went away before registering it"
                )
            await self._peer.changed()

    def close(self) -> None:
        self._local.close()
        self._peer.notify()  # wake our own remote() waiters so they see the closed stream


class MemoryStream:
    """An in-process endpoint of ``rdma:mem:NAME``: bytes travel as messages in memory."""

    transport = "rdma"
    has_return_path = True

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        regions: MemoryRegions,
        uri: str,
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel
        self.regions = regions
        self._uri = uri
        self._message = memoryview(b"")
        self._eof_sent = False
        self._eof_seen = False
        self._closed = False

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if self._eof_sent:
            raise TransportError(f"sending on {self._uri} after send_eof()")
        views, lengths = byte_buffers(flatten(buffers))
        group: list[Buffer] = []
        size = 0
        try:
            for view, length in zip(views, lengths, strict=True):
                group.append(view)
                size += length
                if size >= MESSAGE_SIZE:
                    await self._send_channel.send(b"".join(group))
                    group, size = [], 0
            if group:
                await self._send_channel.send(b"".join(group))
            elif not views:
                await trio.lowlevel.checkpoint()
        except trio.BrokenResourceError as error:
            raise TransportError(
                f"sending on {self._uri} failed: the peer closed the connection"
            ) from error
        except trio.ClosedResourceError as error:
            raise transport_error(f"sending on {self._uri}", error) from error

    async def receive_into(self, buffer: memoryview) -> int:
        check_receive_buffer(buffer)
        if not self._message:
            if self._eof_seen:
                await trio.lowlevel.checkpoint()
                return 0
            try:
                self._message = memoryview(await self._receive_channel.receive())
            except trio.EndOfChannel:
                self._eof_seen = True
                return 0
            except trio.ClosedResourceError as error:
                raise transport_error(f"receiving on {self._uri}", error) from error
        else:
            await trio.lowlevel.checkpoint()
        target = _writable_bytes(buffer)
        count = min(target.nbytes, self._message.nbytes)
        target[:count] = self._message[:count]
        self._message = self._message[count:]
        return count

    async def send_eof(self) -> None:
        self._eof_sent = True
        await self._send_channel.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.regions.close()
            self._send_channel.close()
            self._receive_channel.close()
            self._message = memoryview(b"")
        await trio.lowlevel.checkpoint()


def memory_stream_pair(uri: str = "rdma:mem:pair") -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-process endpoints (in the current trio run)."""
    a_to_b, b_from_a = trio.open_memory_channel[bytes](QUEUE_MESSAGES)
    b_to_a, a_from_b = trio.open_memory_channel[bytes](QUEUE_MESSAGES)
    board_a, board_b = _RegionBoard(), _RegionBoard()
    a = MemoryStream(a_to_b, a_from_b, MemoryRegions(board_a, board_b, uri), uri)
    b = MemoryStream(b_to_a, b_from_a, MemoryRegions(board_b, board_a, uri), uri)
    return a, b


class MemoryListener(ListenerBase):
    """Listens on ``rdma:mem:NAME`` in a MemoryFabric."""

    def __init__(self, fabric: MemoryFabric, address: RdmaMemoryAddress) -> None:
        self._fabric = fabric
        self._address = address
        self._incoming_send, self._incoming = trio.open_memory_channel[MemoryStream](LISTEN_BACKLOG)

    @property
    def address(self) -> RdmaMemoryAddress:
        return self._address

    async def accept(self) -> MemoryStream:
        try:
            return await self._incoming.receive()
        except (trio.ClosedResourceError, trio.EndOfChannel) as error:
            raise TransportError(f"accepting on {self._address.uri}: listener closed") from error

    def _offer(self, stream: MemoryStream) -> None:
        try:
            self._incoming_send.send_nowait(stream)
        except trio.WouldBlock:
            raise TransportError(
                f"connecting to {self._address.uri} failed: its accept backlog is full"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportError(
                f"connecting to {self._address.uri} failed: the listener closed"
            ) from None

    async def aclose(self) -> None:
        self._fabric._forget(self)
        self._incoming_send.close()
        pending: list[MemoryStream] = []
        while True:
            try:
                pending.append(self._incoming.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._incoming.close()
        with trio.CancelScope(shield=True):
            for stream in pending:
                await stream.aclose()
        await trio.lowlevel.checkpoint()


class MemoryFabric:
    """Where ``rdma:mem:NAME`` endpoints of one trio run find each other.

    Create one and pass it to both ``listen(..., fabric=)`` and ``connect(..., fabric=)``;
    there is no global registry.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, MemoryListener] = {}

    async def listen(self, address: RdmaMemoryAddress) -> MemoryListener:
        await trio.lowlevel.checkpoint()
        if address.name in self._listeners:
            raise TransportError(f"cannot listen on {address.uri}: it is already in use")
        listener = MemoryListener(self, address)
        self._listeners[address.name] = listener
        return listener

    async def connect(self, address: RdmaMemoryAddress) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        listener = self._listeners.get(address.name)
        if listener is None:
            raise TransportError(
                f"connecting to {address.uri} failed: nothing listens there in this fabric"
            )
        client, server = memory_stream_pair(address.uri)
        listener._offer(server)
        return client

    def _forget(self, listener: MemoryListener) -> None:
        if self._listeners.get(listener.address.name) is listener:
            del self._listeners[listener.address.name]
