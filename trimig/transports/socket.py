"""Socket transports: ``tcp:HOST:PORT`` and ``unix:PATH`` (also the data path of ``rdma:PATH``)."""

from __future__ import annotations

import contextlib
import os
import socket as stdlib_socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from trimig.errors import ConfigError, TransportError
from trimig.kernel.iov import GatherItem
from trimig.transports.base import (
    ByteStream,
    ListenerBase,
    RegionRegistry,
    StalledError,
    check_receive_buffer,
    transport_error,
    write_gather,
)
from trimig.transports.uri import Address, TcpAddress, UnixAddress

SOCKET_BUFFER_SIZE = 4 * 1024 * 1024
"""SO_SNDBUF/SO_RCVBUF asked for (the kernel caps it at wmem_max/rmem_max)."""

LISTEN_BACKLOG = 16


class ClosableRegions(RegionRegistry, Protocol):
    """A region registry its stream closes along with itself."""

    def close(self) -> None: ...


class SocketStream:
    """A ByteStream over a connected stream socket (tcp or unix)."""

    has_return_path = True

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        transport: str,
        peer: str,
        regions: ClosableRegions | None = None,
    ) -> None:
        self._sock = sock
        self.transport = transport
        self._peer = peer
        self.regions = regions
        self._eof_sent = False
        self._closed = False
        self._stall_timeout: float | None = None

    @property
    def peer(self) -> str:
        """The URI this stream is connected to (or accepted on)."""
        return self._peer

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def stall_timeout(self) -> float | None:
        """Seconds a send may wait with the peer taking no byte before it fails (None: no bound)."""
        return self._stall_timeout

    def set_channel_timeout(self, seconds: float | None) -> None:
        """Dead-peer detection (x-channel-timeout): a send whose peer takes no byte for
        ``seconds`` fails, and on tcp the kernel gives up on unacknowledged data after as
        long (TCP_USER_TIMEOUT) and probes an idle connection (keepalive) within it."""
        self._stall_timeout = seconds
        if self.transport == "tcp" and self._sock.family in (
            stdlib_socket.AF_INET,
            stdlib_socket.AF_INET6,
        ):
            set_tcp_dead_peer_options(self._sock, seconds)

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if self._eof_sent:
            raise TransportError(f"sending on {self._peer} after send_eof()")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await write_gather(self._sock.fileno(), buffers, stall_timeout=self._stall_timeout)
        except StalledError as error:
            raise TransportError(
                f"sending on {self._peer} failed: the peer took nothing for {error.seconds:g} s "
                "(x-channel-timeout)"
            ) from error
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"sending on {self._peer}", error) from error
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_into(self, buffer: memoryview) -> int:
        check_receive_buffer(buffer)
        try:
            return await self._sock.recv_into(buffer)
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"receiving on {self._peer}", error) from error

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._eof_sent:
            self._eof_sent = True
            try:
                self._sock.shutdown(stdlib_socket.SHUT_WR)
            except OSError as error:
                raise transport_error(f"closing the sending side of {self._peer}", error) from error
        await trio.lowlevel.cancel_shielded_checkpoint()

    def shutdown(self) -> None:
        """Shut both directions down (migrate-pause): readers see EOF, writers fail."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(stdlib_socket.SHUT_RDWR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self.regions is not None:
                self.regions.close()
            self._sock.close()
        await trio.lowlevel.checkpoint()


def tune_socket(sock: trio.socket.SocketType) -> None:
    """Large kernel buffers for bulk transfer; TCP_NODELAY for small return-path messages."""
    for option in (stdlib_socket.SO_SNDBUF, stdlib_socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(stdlib_socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
    if sock.family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)


#: Keepalive probes sent before an idle connection is declared dead.
KEEPALIVE_PROBES = 3


def set_tcp_dead_peer_options(sock: trio.socket.SocketType, seconds: float | None) -> None:
    """TCP_USER_TIMEOUT and keepalive so that the kernel declares a silent peer dead within
    about ``seconds`` (keepalive off and the kernel's defaults with None)."""
    if seconds is None:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 0)
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_USER_TIMEOUT, 0)
        return
    idle = max(1, int(seconds / 3))
    interval = max(1, int(seconds / (3 * KEEPALIVE_PROBES)))
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 1)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(
        stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000))
    )


async def connect_tcp(address: TcpAddress) -> SocketStream:
    """Connect to ``tcp:HOST:PORT``, trying each resolved address in turn."""
    if not address.host:
        raise ConfigError(f"{address.uri}: a host is needed to connect (tcp:HOST:PORT)")
    if address.port == 0:
        raise ConfigError(f"{address.uri}: port 0 can only be used to listen")
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=stdlib_socket.SOCK_STREAM
        )
    except stdlib_socket.gaierror as error:
        raise TransportError(
            f"cannot resolve host {address.host!r} of {address.uri}: {error.strerror}"
        ) from error
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, kind, proto)
        try:
            tune_socket(sock)
            await sock.connect(sockaddr)
        except OSError as error:
            sock.close()
            errors.append(error)
            continue
        except BaseException:
            sock.close()
            raise
        return SocketStream(sock, transport="tcp", peer=address.uri)
    raise transport_error(f"connecting to {address.uri}", errors[0]) from errors[0]


async def connect_unix_socket(path: str, uri: str) -> trio.socket.SocketType:
    """A unix stream socket connected to ``path``; failures become TransportError."""
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        tune_socket(sock)
        await sock.connect(path)
    except OSError as error:
        sock.close()
        raise transport_error(f"connecting to {uri}", error) from error
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_unix(address: UnixAddress) -> SocketStream:
    """Connect to ``unix:PATH``."""
    sock = await connect_unix_socket(address.path, address.uri)
    return SocketStream(sock, transport="unix", peer=address.uri)


class SocketListener(ListenerBase):
    """A listening socket; ``wrap`` turns each accepted socket into a ByteStream."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        address: Address,
        wrap: Callable[[trio.socket.SocketType], Awaitable[ByteStream]],
        *,
        unlink_on_close: tuple[str, int, int] | None = None,
    ) -> None:
        self._sock = sock
        self._address = address
        self._wrap = wrap
        self._unlink_on_close = unlink_on_close

    @property
    def address(self) -> Address:
        return self._address

    async def accept(self) -> ByteStream:
        try:
            sock, _ = await self._sock.accept()
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"accepting on {self._address.uri}", error) from error
        try:
            tune_socket(sock)
            return await self._wrap(sock)
        except BaseException:
            sock.close()
            raise

    async def aclose(self) -> None:
        if self._sock.fileno() != -1:
            self._sock.close()
            if self._unlink_on_close is not None:
                path, device, inode = self._unlink_on_close
                with contextlib.suppress(OSError):
                    info = os.stat(path)
                    if (info.st_dev, info.st_ino) == (device, inode):
                        os.unlink(path)
        await trio.lowlevel.checkpoint()


async def listen_tcp(address: TcpAddress) -> SocketListener:
    """Listen on ``tcp:HOST:PORT``; the listener's address carries the bound port."""
    try:
        infos = await trio.socket.getaddrinfo(
            address.host or None,
            address.port,
            type=stdlib_socket.SOCK_STREAM,
            flags=stdlib_socket.AI_PASSIVE,
        )
    except stdlib_socket.gaierror as error:
        raise TransportError(
            f"cannot resolve host {address.host!r} of {address.uri}: {error.strerror}"
        ) from error
    family, kind, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        host, port = sock.getsockname()[:2]
    except OSError as error:
        sock.close()
        raise transport_error(f"listening on {address.uri}", error) from error
    except BaseException:
        sock.close()
        raise
    real = TcpAddress(host, port)

    async def wrap(connection: trio.socket.SocketType) -> ByteStream:
        return SocketStream(connection, transport="tcp", peer=real.uri)

    return SocketListener(sock, real, wrap)


async def bind_unix_socket(
    path: str, uri: str
) -> tuple[trio.socket.SocketType, tuple[str, int, int]]:
    """A listening unix socket at ``path``, replacing a stale socket file but nothing else.

    Returns the socket and (path, st_dev, st_ino) so that closing unlinks only our own file.
    """
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise TransportError(f"cannot listen on {uri}: {path} exists and is not a socket")
        probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody answers: a stale socket file
        except OSError as error:
            raise transport_error(
                f"listening on {uri} ({path} is a socket in use)", error
            ) from None
        else:
            raise TransportError(f"cannot listen on {uri}: another process is listening there")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        info = os.stat(path)
    except OSError as error:
        sock.close()
        raise transport_error(f"listening on {uri}", error) from error
    except BaseException:
        sock.close()
        raise
    return sock, (path, info.st_dev, info.st_ino)


async def listen_unix(address: UnixAddress) -> SocketListener:
    """Listen on ``unix:PATH``; the socket file is removed again by aclose()."""
    sock, identity = await bind_unix_socket(address.path, address.uri)

    async def wrap(connection: trio.socket.SocketType) -> ByteStream:
        return SocketStream(connection, transport="unix", peer=address.uri)

    return SocketListener(sock, address, wrap, unlink_on_close=identity)
