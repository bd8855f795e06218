"""Fixtures for the kernel binding tests: a guest-like child process, memfds.

(``hugepages`` is the suite's, in tests/conftest.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trimig.kernel import PageFault, Userfaultfd

CHILD_SCRIPT = Path(__file__).with_name("uffd_child.py")
CHILD_TIMEOUT = 10.0


class Child:
    """A guest-like child process (uffd_child.py) that registered ``memfd`` with its own
    userfaultfd and sent it to us: ``uffd``, ``address`` (its mapping), ``pid``."""

    def __init__(self, memfd: int, size: int, mode: str, *, hugetlb: bool = False) -> None:
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(CHILD_SCRIPT),
                    str(child_sock.fileno()),
                    str(memfd),
                    str(size),
                    mode,
                    "1" if hugetlb else "0",
                ],
                pass_fds=(child_sock.fileno(), memfd),
            )
        finally:
            child_sock.close()
        self.sock.settimeout(CHILD_TIMEOUT)
        try:
            message, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        except TimeoutError:
            self.close()
            raise
        if not fds:
            self.close()
            raise AssertionError(f"the child sent no userfaultfd (exit {self.process.poll()})")
        hello = json.loads(message)
        self.address: int = hello["address"]
        self.pid: int = hello["pid"]
        self.uffd = Userfaultfd.from_fd(fds[0])

    def request(
        self, command: dict[str, Any], on_fault: Callable[[PageFault], None] | None = None
    ) -> dict[str, Any]:
        """Send ``command`` and wait for the reply, resolving page faults with ``on_fault``
        meanwhile (a fault without ``on_fault`` fails the test)."""
        self.sock.send(json.dumps(command).encode())
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.uffd.fileno(), select.POLLIN)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the child did not answer {command} in time")
            ready = {fd for fd, _ in poller.poll(remaining * 1000)}
            if self.uffd.fileno() in ready:
                for fault in self.uffd.read_faults():
                    if on_fault is None:
                        raise AssertionError(f"unexpected page fault {fault}")
                    on_fault(fault)
            if self.sock.fileno() in ready:
                packet = self.sock.recv(65536)
                if not packet:
                    raise AssertionError(f"the child died (exit {self.process.wait()})")
                return dict(json.loads(packet))

    def close(self) -> None:
        if hasattr(self, "uffd"):
            self.uffd.close()  # wakes the child if it is blocked on a fault
        with contextlib.suppress(OSError):
            self.sock.send(json.dumps({"op": "exit"}).encode())
        self.sock.close()
        try:
            self.process.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def spawn_child() -> Iterator[Callable[..., Child]]:
    """Factory: ``spawn_child(memfd, size, mode, hugetlb=False) -> Child``; reaped at teardown."""
    children: list[Child] = []

    def spawn(memfd: int, size: int, mode: str, *, hugetlb: bool = False) -> Child:
        child = Child(memfd, size, mode, hugetlb=hugetlb)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()


@pytest.fixture
def memfd_factory() -> Iterator[Callable[..., int]]:
    """Factory: ``memfd_factory(size, hugetlb=False) -> fd`` of that size; closed at teardown."""
    from trimig.kernel import memfd_create

    fds: list[int] = []

    def make(size: int, *, hugetlb: bool = False) -> int:
        fd = memfd_create("trimig-test", hugetlb=hugetlb)
        fds.append(fd)
        os.ftruncate(fd, size)
        return fd

    yield make
    for fd in fds:
        os.close(fd)
