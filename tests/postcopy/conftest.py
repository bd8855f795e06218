"""Fixtures for the postcopy tests: a guest child that faults.

(``hugepages`` is the suite's, in tests/conftest.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio

from trimig.kernel import HUGE_PAGE_SIZE, Userfaultfd, memfd_create
from trimig.postcopy.bitmaps import ReceivedBitmap
from trimig.postcopy.blocks import TARGET_PAGE_SIZE, GuestRamBlock

CHILD_SCRIPT = Path(__file__).with_name("guest_child.py")
CHILD_TIMEOUT = 10.0


class Guest:
    """A child process that mapped the engine's memfds, registered them with its own
    userfaultfd (MISSING) and sent us the uffd. ``blocks`` are GuestRamBlocks with the
    child's addresses and our memfds; ``received`` is a fresh ReceivedBitmap."""

    def __init__(self, specs: Sequence[tuple[str, int, bool]], *, blocking_uffd: bool) -> None:
        self.memfds: list[int] = []
        for name, size, hugetlb in specs:
            fd = memfd_create(f"test:{name}", hugetlb=hugetlb)
            self.memfds.append(fd)
            os.ftruncate(fd, size)
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with child_sock:
            self.process = subprocess.Popen(
                [sys.executable, str(CHILD_SCRIPT), str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
            )
        self.sock.settimeout(CHILD_TIMEOUT)
        setup = {
            "blocks": [{"name": n, "size": s, "hugetlb": h} for n, s, h in specs],
            "blocking_uffd": blocking_uffd,
        }
        socket.send_fds(self.sock, [json.dumps(setup).encode()], self.memfds)
        packet, fds, _, _ = socket.recv_fds(self.sock, 65536, 1)
        if not fds:
            raise AssertionError(f"the guest child sent no uffd (exit {self.process.poll()})")
        hello = json.loads(packet)
        self.pid: int = hello["pid"]
        self.uffd = Userfaultfd.from_fd(fds[0])
        self.blocks = [
            GuestRamBlock(
                name,
                hello["addresses"][name],
                size,
                HUGE_PAGE_SIZE if hugetlb else TARGET_PAGE_SIZE,
                fd,
            )
            for (name, size, hugetlb), fd in zip(specs, self.memfds, strict=True)
        ]
        self.received = ReceivedBitmap(self.blocks)
        self._trio_sock: trio.socket.SocketType | None = None

    async def digest(self, block: str, offsets: Sequence[int], length: int) -> list[str]:
        """Have the child read ``[o, o+length)`` of ``block`` for each offset (faulting as
        needed) and return the sha256 hex digests."""
        if self._trio_sock is None:
            self._trio_sock = trio.socket.from_stdlib_socket(self.sock)
        command = {"op": "digest", "block": block, "offsets": list(offsets), "length": length}
        await self._trio_sock.send(json.dumps(command).encode())
        packet = await self._trio_sock.recv(1 << 20)
        if not packet:
            raise AssertionError(f"the guest child died (exit {self.process.wait()})")
        reply = json.loads(packet)
        assert "sha256" in reply, reply
        return list(reply["sha256"])

    def close(self) -> None:
        self.uffd.close()  # unregisters: wakes the child if it is blocked on a fault
        with contextlib.suppress(OSError):
            self.sock.send(json.dumps({"op": "exit"}).encode())
        self.sock.close()
        try:
            self.process.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in self.memfds:
            os.close(fd)


@pytest.fixture
def spawn_guest() -> Iterator[Callable[..., Guest]]:
    """Factory: ``spawn_guest([(name, size, hugetlb), ...], blocking_uffd=False)``."""
    guests: list[Guest] = []

    def spawn(specs: Sequence[tuple[str, int, bool]], *, blocking_uffd: bool = False) -> Guest:
        guest = Guest(specs, blocking_uffd=blocking_uffd)
        guests.append(guest)
        return guest

    yield spawn
    for guest in guests:
        guest.close()


def as_records(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Lay ``pages`` out like the decoder's buffer (an 8-byte record header before each
    page) and return the (n, 4096) view into it: rows are 4104 bytes apart."""
    dtype = np.dtype([("hdr", ">u8"), ("data", np.uint8, (TARGET_PAGE_SIZE,))])
    records = np.zeros(pages.shape[0], dtype=dtype)
    records["data"] = pages
    view: npt.NDArray[np.uint8] = records["data"]
    return view
