"""Blocking loops in OS threads, owned by trio tasks (postcopy's latency-critical paths).

A postcopy page fault is a short chain of small steps, each waiting on a file descriptor:
the destination reads the fault and writes a page request, the source reads the request
and writes the page, the destination reads the page and places it. In a trio task every
step waits for the event loop to come back from whatever bulk work (megabytes of
background pages) it is doing, and for the process to be scheduled at all when both
engines keep the CPUs busy. A thread that sleeps in ``poll()`` is woken by the kernel the
moment its fd is ready and, having slept, tends to run at once; the bulk work releases
the GIL in every system call and ioctl. So those steps run in threads, each a plain
blocking loop over non-blocking fds:

* :func:`run_in_thread` runs ``loop(stop)`` in a thread for the lifetime of a trio task
  (start it with ``nursery.start``). Cancelling the task sets ``stop`` and waits for the
  loop to return: the thread never outlives its owner.
* The loop waits with :func:`wait_readable`, reads with :func:`read_into` (or
  :func:`readv_into`) and writes with :func:`write_all`: the thread drivers of the
  synchronous steps of ``trimig.kernel.iov``. The reads watch ``stop``; ``write_all`` does
  not (a message goes out whole) but gives up when the peer takes nothing for a while.
* A migration stream is read and written from a thread through its :class:`ThreadStream`
  (:func:`thread_stream`): its fd's bytes raw (a socket), or, for TLS, the thread driver
  of its session (transports/tls_thread.py: records decrypted and encrypted in the
  thread, only ciphertext over the fd).

The GIL. Every system call a thread makes lets the main thread take the GIL; getting it
back waits for the main thread's next system call or, when the main thread is busy in
Python (encoding or decoding bulk pages), for the interpreter's switch interval, 5 ms by
default. That wait would be most of a fault's latency, so :func:`run_in_thread` lowers the
process's switch interval to LATENCY_SWITCH_INTERVAL. It never raises it back: the
interval only matters while a thread waits for the GIL, so it costs nothing otherwise,
and restoring it would need process-wide bookkeeping of overlapping threads.

The CPUs. While both engines stream pages, the bulk work keeps the CPUs busy, and a woken
thread may wait for one. Urgent threads (each step of a fault's round trip) therefore
ask for a higher priority (URGENT_NICE) where the process is allowed to raise one, and
give it back when they end. On the 2-core development machine, loaded by other work,
that halved the blocktime of a 1 GiB postcopy.

Only streams with a thread stream can be served this way; the owners fall back to trio
tasks for the others (the in-process transport).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import trio

from ._trio import open_nursery
from .errors import TransportError
from .kernel.iov import Buffer, GatherItem, GatherWrite, IoVector, readv

T = TypeVar("T")

LATENCY_SWITCH_INTERVAL = 0.0001
"""Seconds a thread waiting for the GIL waits before the holder is asked to drop it."""

_FAST_WRITE = 8  # write_all tries one plain os.writev first for up to this many buffers

URGENT_NICE = -10
"""Nice value of urgent threads (best effort: raising a priority needs CAP_SYS_NICE or a
RLIMIT_NICE that allows it; without, they run at the process's)."""

__all__ = [
    "StopSignal",
    "ThreadStream",
    "read_into",
    "readv_into",
    "run_in_thread",
    "thread_stream",
    "wait_readable",
    "write_all",
]


class StopSignal:
    """A pipe a thread loop polls beside its own fds; :meth:`set` asks the loop to return."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already set
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return bool(select.select([self._read], [], [], 0)[0])

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


async def run_in_thread(
    loop: Callable[[StopSignal], T],
    *,
    urgent: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> T:
    """Run ``loop(stop)`` in an OS thread; return its result or raise its exception.

    Reports started at once (the thread's fds can be ready before it polls them: nothing
    is lost). When this task is cancelled, ``stop`` is set and the task waits for the loop
    to return, which it must do promptly once ``stop`` is readable. Lowers the process's
    GIL switch interval to at most LATENCY_SWITCH_INTERVAL (see the module's docstring).
    An ``urgent`` thread (a step of a fault's round trip) runs at URGENT_NICE where the
    process may raise a thread's priority.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), LATENCY_SWITCH_INTERVAL))

    def thread_main(stop: StopSignal) -> T:
        with _priority(URGENT_NICE if urgent else None):
            return loop(stop)

    stop = StopSignal()
    try:
        async with open_nursery() as nursery:

            async def stop_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    stop.set()

            nursery.start_soon(stop_when_cancelled)
            task_status.started()
            # Not abandoned when cancelled (trio's default, so no keyword: it was renamed in
            # 0.23): the loop returns once stop is set.
            result = await trio.to_thread.run_sync(thread_main, stop)
            nursery.cancel_scope.cancel()
        return result
    finally:
        stop.close()


@contextlib.contextmanager
def _priority(nice: int | None) -> Iterator[None]:
    """Run the calling thread at ``nice`` (if allowed) and restore its value after: trio's
    worker threads are reused."""
    if nice is None:
        yield
        return
    thread = threading.get_native_id()
    previous = os.getpriority(os.PRIO_PROCESS, thread)
    try:
        os.setpriority(os.PRIO_PROCESS, thread, nice)
        raised = True
    except PermissionError:
        raised = False
    try:
        yield
    finally:
        if raised:
            os.setpriority(os.PRIO_PROCESS, thread, previous)


class ThreadStream:
    """A migration stream's bytes, read and written from an OS thread (blocking) over its
    non-blocking ``fd``: raw here (a socket's); a subclass may transform them (TLS:
    ``transports.tls_thread.TlsThreadStream`` decrypts and encrypts in the thread)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readv_into(
        self,
        buffers: Sequence[memoryview],
        stop: StopSignal,
        *,
        what: str,
        timeout: float | None = None,
    ) -> int | None:
        """As :func:`readv_into`: at least one byte (scattered over ``buffers``), 0 at the
        end, None once ``stop`` is set; TransportError naming ``what``."""
        return readv_into(self.fd, buffers, stop, what=what, timeout=timeout)

    def write_all(self, buffers: Sequence[GatherItem], *, timeout: float, what: str) -> int:
        """As :func:`write_all`: every byte of ``buffers`` out; the count."""
        return write_all(self.fd, buffers, timeout=timeout, what=what)


def thread_stream(stream: object) -> ThreadStream | None:
    """How an OS thread reads and writes ``stream``: its class's ``thread_stream()`` (TLS:
    None when it cannot be had), else a ThreadStream of its fd when its class has a
    ``fileno`` (sockets), else None (in-process streams). Looked up on the class: a
    wrapper that forwards attributes to a socket stream (to watch or alter its bytes) is
    not bypassed, it is served through its methods."""
    make = getattr(type(stream), "thread_stream", None)
    if callable(make):
        made: ThreadStream | None = make(stream)
        return made
    fileno = getattr(type(stream), "fileno", None)
    return ThreadStream(int(fileno(stream))) if callable(fileno) else None


def wait_readable(
    fds: Sequence[int], stop: StopSignal, *, timeout: float | None = None
) -> list[int] | None:
    """Block until some of ``fds`` are readable (or hung up); those fds, or None once
    ``stop`` is set; an empty list after ``timeout`` seconds with neither."""
    poller = select.poll()
    for fd in (*fds, stop.fileno()):
        poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        ready = [fd for fd, _ in poller.poll(wait)]
        if stop.fileno() in ready:
            return None
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return ready


def read_into(
    fd: int, buffer: memoryview, stop: StopSignal, *, what: str, timeout: float | None = None
) -> int | None:
    """Read at least one byte from the non-blocking ``fd`` into ``buffer``; the count, 0 at
    EOF, or None once ``stop`` is set. Errors raise TransportError naming ``what``, and so
    does a wait of ``timeout`` seconds with nothing to read (dead-peer detection)."""
    return readv_into(fd, [buffer], stop, what=what, timeout=timeout)


def readv_into(
    fd: int,
    buffers: Sequence[memoryview],
    stop: StopSignal,
    *,
    what: str,
    timeout: float | None = None,
) -> int | None:
    """Like :func:`read_into`, scattering what one readv takes over ``buffers`` in order."""
    while True:
        try:
            count = readv(fd, buffers)
        except OSError as error:
            reason = os.strerror(error.errno or 0)
            raise TransportError(f"reading {what} failed: {reason}") from error
        if count is not None:
            return count
        ready = wait_readable([fd], stop, timeout=timeout)
        if ready is None:
            return None
        if not ready:
            raise TransportError(
                f"reading {what} failed: nothing received for {timeout:g} s (x-channel-timeout)"
            )


def write_all(fd: int, buffers: Sequence[GatherItem], *, timeout: float, what: str) -> int:
    """Write every byte of ``buffers`` to the non-blocking ``fd`` from this thread, blocking
    until it is out (gather writes, waiting for room as needed); return the count. Not
    stopped by a StopSignal: a message goes out whole. Raises TransportError naming
    ``what`` if the peer takes nothing for ``timeout`` seconds or the write fails.

    A few plain buffers (an urgent page, a page request) first go to one os.writev, which
    takes them whole when the socket has room: the GatherWrite loop only runs after it."""
    written = 0
    if len(buffers) <= _FAST_WRITE and not any(isinstance(item, IoVector) for item in buffers):
        plain = cast("Sequence[Buffer]", buffers)
        try:
            written = os.writev(fd, plain)
        except (BlockingIOError, InterruptedError, BufferError):
            pass  # no room yet, or a buffer GatherWrite refuses with the clearer error
        except OSError as error:
            raise _write_failed(what, error) from error
        total = 0
        for item in plain:
            total += memoryview(item).nbytes
        if written == total:
            return total
    gather = GatherWrite(buffers)
    if written:
        gather.advance(written)
    deadline = time.monotonic() + timeout
    remaining = gather.remaining
    while True:
        try:
            if gather.write(fd):
                return gather.total
        except OSError as error:
            raise _write_failed(what, error) from error
        if gather.remaining < remaining:  # progress: the peer gets another ``timeout``
            remaining = gather.remaining
            deadline = time.monotonic() + timeout
        wait = deadline - time.monotonic()
        ready = select.poll()
        ready.register(fd, select.POLLOUT)
        if wait <= 0 or not ready.poll(wait * 1000):
            raise TransportError(f"writing {what} failed: the peer took nothing for {timeout:g} s")


def _write_failed(what: str, error: OSError) -> TransportError:
    reason = os.strerror(error.errno or 0)
    if error.errno in (errno.EPIPE, errno.ECONNRESET):
        reason += " (the peer closed the connection)"
    return TransportError(f"writing {what} failed: {reason}")
