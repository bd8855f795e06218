"""trimig's RDMA-shaped transport: one-sided writes into registered memory plus a message queue.

The destination registers its RAM blocks as regions; the source obtains a writable view of
each (``await stream.regions.remote(name)``), writes pages straight into the destination's
memory and announces them on the stream. The stream itself (the migration stream one way,
the return path the other) is an ordinary byte stream. Two flavours:

``rdma:mem:NAME`` (in process)
    Both ends live in one trio run and meet through a ``MemoryFabric`` passed explicitly to
    ``listen``/``connect``. The message queue is a pair of trio memory channels carrying
    ``bytes``; ``remote(name)`` returns a view of the very buffer the peer registered.

``rdma:PATH`` (between processes)
    Two connections: the data connection is a unix stream socket at PATH carrying the stream
    bytes and nothing else (so its framing is the byte stream itself); the control connection
    is a ``SOCK_SEQPACKET`` socketpair made by the connecting side, whose other end crosses in
    the handshake (``HELLO`` plus SCM_RIGHTS, the first bytes on the data connection). On the
    control connection each packet is one registration: ``b"R"``, ``be64 size``, the UTF-8
    name (1-255 bytes), with the memfd attached by SCM_RIGHTS. The receiver maps it
    ``MAP_SHARED``. A closed control connection means the peer went away.

Views returned by ``remote()`` should be dropped before the stream is closed: a mapping with
live views is unmapped (and its fd closed) only when the last view goes away.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket as stdlib_socket
import struct
from collections.abc import Sequence

import trio

from trimig.errors import KernelError, LocalProtocolError, RemoteProtocolError, TransportError
from trimig.kernel import fdpass
from trimig.kernel.iov import Buffer, GatherItem, byte_buffers, flatten
from trimig.transports.base import (
    ListenerBase,
    RegionRegistry,
    check_receive_buffer,
    transport_error,
)
from trimig.transports.socket import (
    LISTEN_BACKLOG,
    SocketListener,
    SocketStream,
    bind_unix_socket,
    connect_unix_socket,
)
from trimig.transports.uri import RdmaMemoryAddress, RdmaSocketAddress

HELLO = b"TRIMIG-RDMA/1\n"
"""First bytes on the data connection of ``rdma:PATH``; the control socket rides with them."""

_REGISTER = b"R"
_REGISTER_HEADER = struct.Struct(">cQ")
_MAX_NAME = 255
_MAX_FDS = 4

MESSAGE_SIZE = 1024 * 1024
"""In-process: send_buffers() joins buffers into messages of about this size."""

QUEUE_MESSAGES = 16
"""In-process: messages in flight per direction before send_buffers() waits."""


def _check_registration(name: str, size: int, buffer: memoryview) -> bytes:
    encoded = name.encode()
    if not 1 <= len(encoded) <= _MAX_NAME:
        raise LocalProtocolError(
            f"region name {name!r} must be 1-{_MAX_NAME} bytes of UTF-8, not {len(encoded)}"
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


def _writable_bytes(buffer: memoryview) -> memoryview:
    view = memoryview(buffer)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


# ---------------------------------------------------------------------------------------
# In-process flavour


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
        _check_registration(name, size, buffer)
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

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        regions: MemoryRegions,
        uri: str,
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel
        self._regions = regions
        self._uri = uri
        self._message = memoryview(b"")
        self._eof_sent = False
        self._eof_seen = False
        self._closed = False

    @property
    def transport(self) -> str:
        return "rdma"

    @property
    def has_return_path(self) -> bool:
        return True

    @property
    def regions(self) -> RegionRegistry | None:
        return self._regions

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
            self._regions.close()
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


# ---------------------------------------------------------------------------------------
# Cross-process flavour


class SocketRegions:
    """RegionRegistry of ``rdma:PATH``: registrations travel as memfds on a control socket."""

    def __init__(self, control: trio.socket.SocketType, uri: str) -> None:
        self._control = control
        self._uri = uri
        self._registered: set[str] = set()
        self._mapped: dict[str, mmap.mmap] = {}
        self._peer_gone = False
        self._closed = False
        self._read_lock = trio.Lock()

    async def register(self, name: str, fd: int, size: int, buffer: memoryview) -> None:
        """Send ``fd`` (holding at least ``size`` bytes) to the peer under ``name``."""
        encoded = _check_registration(name, size, buffer)
        if self._closed:
            raise TransportError(f"registering region {name!r} on {self._uri}: stream is closed")
        if name in self._registered:
            raise LocalProtocolError(f"region {name!r} is already registered on {self._uri}")
        try:
            held = os.fstat(fd).st_size
        except OSError as error:
            raise LocalProtocolError(f"fd {fd} of region {name!r}: {error.strerror}") from error
        if held < size:
            raise LocalProtocolError(
                f"fd {fd} of region {name!r} holds {held} bytes, less than its size {size}"
            )
        message = _REGISTER_HEADER.pack(_REGISTER, size) + encoded
        try:
            await self._control.sendmsg([message], fdpass.rights([fd]))
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"registering region {name!r} on {self._uri}", error) from error
        self._registered.add(name)

    async def remote(self, name: str) -> memoryview:
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise TransportError(f"region {name!r} of {self._uri}: the stream is closed")
            mapping = self._mapped.get(name)
            if mapping is not None:
                return memoryview(mapping)
            if self._peer_gone:
                raise TransportError(
                    f"region {name!r} of {self._uri}: the peer went away before registering it"
                )
            async with self._read_lock:
                if name not in self._mapped and not self._peer_gone:
                    await self._read_registration()

    async def _read_registration(self) -> None:
        try:
            data, fds, flags = fdpass.unpack(
                await self._control.recvmsg(
                    1 + 8 + _MAX_NAME + 1,
                    fdpass.ancillary_size(_MAX_FDS),
                    stdlib_socket.MSG_CMSG_CLOEXEC,
                )
            )
        except (OSError, trio.ClosedResourceError) as error:
            if self._closed:
                raise TransportError(f"{self._uri}: the stream is closed") from error
            raise transport_error(f"reading registrations on {self._uri}", error) from error
        try:
            if not data:
                self._peer_gone = True
                return
            self._map_registration(data, flags, fds)
        finally:
            fdpass.close_fds(fds)

    def _map_registration(self, data: bytes, flags: int, fds: list[int]) -> None:
        where = f"registration on {self._uri}"
        if flags & (stdlib_socket.MSG_CTRUNC | stdlib_socket.MSG_TRUNC):
            raise RemoteProtocolError(f"{where}: message or its file descriptors were truncated")
        if len(data) < _REGISTER_HEADER.size + 1 or data[:1] != _REGISTER:
            raise RemoteProtocolError(f"{where}: malformed message {data[:16]!r}")
        _, size = _REGISTER_HEADER.unpack_from(data)
        try:
            name = data[_REGISTER_HEADER.size :].decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{where}: region name is not UTF-8") from None
        if len(fds) != 1:
            raise RemoteProtocolError(f"{where}: region {name!r} came with {len(fds)} fds, not 1")
        if name in self._mapped:
            raise RemoteProtocolError(f"{where}: region {name!r} registered twice")
        held = os.fstat(fds[0]).st_size
        if size <= 0 or held < size:
            raise RemoteProtocolError(
                f"{where}: region {name!r} claims {size} bytes but its fd holds {held}"
            )
        try:
            mapping = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            raise KernelError("mmap", error.errno or 0, f"region {name!r}") from error
        self._mapped[name] = mapping

    def close(self) -> None:
        """Close the control connection and unmap the peer's regions (once their views die)."""
        self._closed = True
        self._control.close()
        for mapping in self._mapped.values():
            # With views still alive it is unmapped when the last one goes.
            with contextlib.suppress(BufferError):
                mapping.close()
        self._mapped.clear()


async def connect_rdma_socket(address: RdmaSocketAddress) -> SocketStream:
    """Connect to ``rdma:PATH``: data connection plus a control socketpair sent in HELLO."""
    data = await connect_unix_socket(address.path, address.uri)
    mine: stdlib_socket.socket | None = None
    try:
        mine, theirs = stdlib_socket.socketpair(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_SEQPACKET)
        with theirs:
            sent = await data.sendmsg([HELLO], fdpass.rights([theirs.fileno()]))
        while sent < len(HELLO):
            sent += await data.send(HELLO[sent:])
        control = trio.socket.from_stdlib_socket(mine)
    except BaseException as error:
        data.close()
        if mine is not None:
            mine.close()
        if isinstance(error, OSError):
            raise transport_error(f"connecting to {address.uri}", error) from error
        raise
    return SocketStream(
        data, transport="rdma", peer=address.uri, regions=SocketRegions(control, address.uri)
    )


async def _accept_rdma(sock: trio.socket.SocketType, uri: str) -> SocketStream:
    """Read HELLO and the control socket from a freshly accepted data connection."""
    received = b""
    control_fd: int | None = None
    try:
        while len(received) < len(HELLO):
            data, fds, _ = fdpass.unpack(
                await sock.recvmsg(
                    len(HELLO) - len(received),
                    fdpass.ancillary_size(_MAX_FDS),
                    stdlib_socket.MSG_CMSG_CLOEXEC,
                )
            )
            if fds and control_fd is None:
                control_fd = fds.pop(0)
            fdpass.close_fds(fds)
            if not data:
                raise TransportError(f"accepting on {uri}: the peer left during the handshake")
            received += data
        if received != HELLO or control_fd is None:
            raise TransportError(
                f"accepting on {uri}: the peer did not open with the trimig rdma handshake "
                f"(got {received!r}); is it a trimig rdma: client?"
            )
        control = stdlib_socket.socket(fileno=control_fd)
        control_fd = None  # the socket object owns it now
        if control.type != stdlib_socket.SOCK_SEQPACKET:
            control.close()
            raise TransportError(f"accepting on {uri}: the control socket is not SOCK_SEQPACKET")
    except OSError as error:
        raise transport_error(f"accepting on {uri}", error) from error
    finally:
        if control_fd is not None:
            os.close(control_fd)
    return SocketStream(
        sock,
        transport="rdma",
        peer=uri,
        regions=SocketRegions(trio.socket.from_stdlib_socket(control), uri),
    )


async def listen_rdma_socket(address: RdmaSocketAddress) -> SocketListener:
    """Listen on ``rdma:PATH`` (a unix socket file, removed again by aclose())."""
    sock, identity = await bind_unix_socket(address.path, address.uri)

    async def wrap(connection: trio.socket.SocketType) -> SocketStream:
        return await _accept_rdma(connection, address.uri)

    return SocketListener(sock, address, wrap, unlink_on_close=identity)
