"""Leak checks for tests: file descriptors, child processes and memfd mappings of the test process.

The whole suite runs under the autouse ``no_leaks`` fixture of ``tests/conftest.py``; a
test whose scaffolding (not the code under test) keeps something open past its end is
marked ``@pytest.mark.leaks_allowed("why")``.

Explicit use (objects still alive, e.g. right after a cancelled operation and aclose())::

    before = ResourceSnapshot.take()
    ...
    assert_no_leaks(before)

or around a block::

    with leak_check():
        ...

A leak is an fd open now that was not open before (same number and same target), a child
process (running or zombie) that was not there before, or a shared mapping of a memfd
(a ``/memfd:`` line of /proc/self/maps: guest RAM blocks are ``/memfd:trimig:NAME``) that
was not there before. Objects freed by the garbage collector count as leaks only if they
are still open after ``gc.collect()``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import Counter
from collections.abc import Iterator

import attrs

#: /proc/self/maps names a memfd mapping "/memfd:NAME (deleted)".
MEMFD_MAPPING = "/memfd:"


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


def memfd_mappings() -> Counter[str]:
    """This process's memfd mappings: each /proc/self/maps line naming a memfd, counted."""
    with open("/proc/self/maps") as maps:
        return Counter(line.rstrip("\n") for line in maps if MEMFD_MAPPING in line)


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
    mappings: Counter[str] = attrs.field(factory=Counter)

    @classmethod
    def take(cls) -> ResourceSnapshot:
        return cls(open_fds(), frozenset(child_pids()), memfd_mappings())

    def leaks(self) -> list[str]:
        """Descriptions of fds, children and memfd mappings that exist now but did not at
        the snapshot."""
        found = [
            f"fd {fd} -> {target}"
            for fd, target in sorted(open_fds().items())
            if self.fds.get(fd) != target
        ]
        found += [describe_process(pid) for pid in sorted(child_pids() - self.children)]
        found += [f"mapping {line}" for line in sorted(memfd_mappings() - self.mappings)]
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
