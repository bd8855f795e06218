"""trimig.kernel.fdpass, and the readv and pwritev steps of trimig.kernel.iov, for real."""

from __future__ import annotations

import os
import socket

import pytest

from trimig.kernel import fdpass
from trimig.kernel.iov import GatherWrite, readv


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_STREAM])
def test_fds_cross_with_the_message_close_on_exec(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    read_end, write_end = os.pipe()
    with a, b:
        try:
            assert fdpass.send_fds(a, [b"hello"], [read_end, write_end]) == 5
            received = fdpass.recv_fds(b, 100, 4)
            assert received.data == b"hello" and not received.truncated
            assert len(received.fds) == 2
            try:
                assert all(not os.get_inheritable(fd) for fd in received.fds)
                os.write(received.fds[1], b"x")
                assert os.read(read_end, 1) == b"x"
            finally:
                fdpass.close_fds(received.fds)
        finally:
            fdpass.close_fds([read_end, write_end])


def test_too_many_fds_are_dropped_and_flagged() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(4)]
    fds = [fd for pipe in pipes for fd in pipe]
    with a, b:
        try:
            fdpass.send_fds(a, [b"m"], fds)
            received = fdpass.recv_fds(b, 100, 1)
            fdpass.close_fds(received.fds)
            assert received.truncated and received.flags & socket.MSG_CTRUNC
            assert len(received.fds) < len(fds)  # as many as the aligned buffer holds
        finally:
            fdpass.close_fds(fds)


def test_no_fds_and_end_of_file() -> None:
    assert fdpass.rights([]) == []
    with pytest.raises(ValueError, match="at most 253"):
        fdpass.rights(list(range(254)))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with b:
        with a:
            fdpass.send_fds(a, [b"plain"], [])
        received = fdpass.recv_fds(b, 100, 1)
        assert (received.data, received.fds, received.truncated) == (b"plain", [], False)
        assert fdpass.recv_fds(b, 100, 1)[:2] == (b"", [])


def test_recv_fds_does_not_wait_when_asked_not_to() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(BlockingIOError):
        fdpass.recv_fds(b, 100, 1, flags=socket.MSG_DONTWAIT)


def test_readv_says_none_when_nothing_is_there() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    with a, b:
        first, second = memoryview(bytearray(2)), memoryview(bytearray(8))
        assert readv(b.fileno(), [first, second]) is None
        a.send(b"abcdef")
        assert readv(b.fileno(), [first, second]) == 6
        assert bytes(first) == b"ab" and bytes(second[:4]) == b"cdef"
        a.shutdown(socket.SHUT_WR)
        assert readv(b.fileno(), [first]) == 0


def test_gather_write_at_fills_a_file_at_an_offset() -> None:
    fd = os.memfd_create("gather")
    try:
        gather = GatherWrite([b"abc", bytearray(b"de"), memoryview(b"fgh")])
        gather.write_at(fd, 10)
        assert gather.done and gather.remaining == 0 and gather.total == 8
        assert os.pread(fd, 20, 0) == bytes(10) + b"abcdefgh"
    finally:
        os.close(fd)
