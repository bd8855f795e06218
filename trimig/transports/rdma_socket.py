"""The cross-process RDMA-shaped transport, ``rdma:PATH``: one-sided writes into registered
memory plus a byte stream.

The destination registers its RAM blocks as regions; the source obtains a writable view of
each (``await stream.regions.remote(name)``), writes pages straight into the destination's
memory and announces them on the stream. The stream itself (the migration stream one way,
the return path the other) is an ordinary byte stream. (The in-process flavour,
``rdma:mem:NAME``, is ``rdma_memory.py``; ``RegionRegistry`` in ``base.py`` describes what
both offer.)

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

import trio

from trimig.errors import KernelError, LocalProtocolError, RemoteProtocolError, TransportError
from trimig.kernel import fdpass
from trimig.transports.base import MAX_REGION_NAME, check_registration, transport_error
from trimig.transports.socket import (
    SocketListener,
    SocketStream,
    bind_unix_socket,
    connect_unix_socket,
)
from trimig.transports.uri import RdmaSocketAddress

HELLO = b"TRIMIG-RDMA/1\n"
"""First bytes on the data connection of ``rdma:PATH``; the control socket rides with them."""

_REGISTER = b"R"
_REGISTER_HEADER = struct.Struct(">cQ")
_MAX_FDS = 4


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
        encoded = check_registration(name, size, buffer)
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
                    1 + 8 + MAX_REGION_NAME + 1,
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
