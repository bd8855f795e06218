"""Passing file descriptors over unix sockets (SCM_RIGHTS), SOCK_SEQPACKET or SOCK_STREAM.

The only home of the ancillary-data plumbing. :func:`send_fds` and :func:`recv_fds` are
the blocking (or, with ``MSG_DONTWAIT``, non-blocking) calls on a standard socket; a trio
socket sends with ``await sock.sendmsg(buffers, rights(fds))`` and receives with
``unpack(await sock.recvmsg(size, ancillary_size(max_fds), socket.MSG_CMSG_CLOEXEC))``.
Received fds are close-on-exec and belong to the caller.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from .iov import Buffer

SCM_MAX_FD: Final = 253
"""The most fds one message may carry (the kernel's SCM_MAX_FD)."""

FD_SIZE: Final = array.array("i").itemsize


class Received(NamedTuple):
    """One message and the fds that came with it (the receiver owns them)."""

    data: bytes
    fds: list[int]
    flags: int
    """recvmsg's flags: ``MSG_TRUNC`` (the message was cut short), ``MSG_CTRUNC`` (some
    fds were dropped: the ancillary buffer was too small)."""

    @property
    def truncated(self) -> bool:
        return bool(self.flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The sendmsg ancillary data carrying ``fds`` with SCM_RIGHTS (empty list for none)."""
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"one message can carry at most {SCM_MAX_FD} fds, not {len(fds)}")
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def ancillary_size(max_fds: int) -> int:
    """The recvmsg ancillary buffer size that takes ``max_fds`` fds."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE)


def take_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds in recvmsg's ancillary data."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
    return list(fds)


def unpack(result: tuple[bytes, list[tuple[int, int, bytes]], int, Any]) -> Received:
    """A recvmsg result (``data, ancdata, flags, address``) as a :class:`Received`."""
    data, ancdata, flags, _ = result
    return Received(data, take_fds(ancdata), flags)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send_fds(
    sock: socket.socket, buffers: Sequence[Buffer], fds: Sequence[int], *, flags: int = 0
) -> int:
    """Send ``buffers`` (one message on SOCK_SEQPACKET) with ``fds`` attached; the byte
    count. The fds stay the caller's (the peer receives copies)."""
    return sock.sendmsg(buffers, rights(fds), flags)


def recv_fds(sock: socket.socket, size: int, max_fds: int, *, flags: int = 0) -> Received:
    """Receive up to ``size`` bytes (one message on SOCK_SEQPACKET) and up to ``max_fds``
    fds, close-on-exec. An empty ``data`` with no fds is end of file. With
    ``flags=socket.MSG_DONTWAIT`` raises BlockingIOError when nothing is queued."""
    return unpack(sock.recvmsg(size, ancillary_size(max_fds), flags | socket.MSG_CMSG_CLOEXEC))
