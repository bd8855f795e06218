"""Leak checks for tests: file descriptors and child processes of the test process.

Usage, explicit (objects still alive, e.g. right after a cancelled operation and aclose())::

    before = ResourceSnapshot.take()
    ...
    assert_no_leaks(before)

or as a fixture (sync, so it brackets the whole trio run of an async test)::

    @pytest.fixture(autouse=True)
    def no_leaks():
        with leak_check():
            yield

A leak is an fd open now that was not open before (same number and same target) or a child
process (running or zombie) that was not there before. Objects freed by the garbage
collector count as leaks only if they are still open after ``gc.collect()``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator

import attrs


def open_fds() -> dict[int, str]:
    """This process's open fds and what each refers to (readlink of /proc/self/fd/N)."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        # FileNotFoundError: the directory fd listdir used, closed by now.
        with contextlib.suppress(FileNotFoundError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def child_pids() -> set[int]:
    """Children of this process (any thread's), zombies included."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
        except FileNotFoundError:
            pass  # the thread exited meanwhile
    return pids


def describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return f"pid {pid} (gone)"
    kind = "zombie" if state == "Z" else f"state {state}"
    return f"pid {pid} ({kind}) {command!r}"


@attrs.frozen
class ResourceSnapshot:
    fds: dict[int, str]
    children: frozenset[int]

    @classmethod
    def take(cls) -> ResourceSnapshot:
        return cls(open_fds(), frozenset(child_pids()))

    def leaks(self) -> list[str]:
        """Descriptions of fds and children that exist now but did not at the snapshot."""
        found = [
            f"fd {fd} -> {target}"
            for fd, target in sorted(open_fds().items())
            if self.fds.get(fd) != target
        ]
        found += [describe_process(pid) for pid in sorted(child_pids() - self.children)]
        return found


def assert_no_leaks(before: ResourceSnapshot, *, settle: float = 1.0) -> None:
    """Fail listing what leaked since ``before``.

    Allows ``settle`` seconds for children that are being reaped, and one gc.collect().
    """
    deadline = time.monotonic() + settle
    leaks = before.leaks()
    while leaks:
        gc.collect()
        leaks = before.leaks()
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaks, "resources leaked: " + "; ".join(leaks)


@contextlib.contextmanager
def leak_check(*, settle: float = 1.0) -> Iterator[ResourceSnapshot]:
    """Check on exit that nothing opened inside the block is still open."""
    before = ResourceSnapshot.take()
    yield before
    assert_no_leaks(before, settle=settle)
