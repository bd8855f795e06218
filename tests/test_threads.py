"""trimig.threads: thread loops owned by trio tasks, and their blocking fd helpers."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import trio

from trimig.errors import TransportError
from trimig.threads import (
    LATENCY_SWITCH_INTERVAL,
    URGENT_NICE,
    StopSignal,
    ThreadStream,
    read_into,
    run_in_thread,
    thread_stream,
    wait_readable,
    write_all,
)


async def test_a_thread_loop_returns_its_result() -> None:
    def loop(stop: StopSignal) -> int:
        assert threading.current_thread() is not threading.main_thread()
        return 42

    assert await run_in_thread(loop) == 42


async def test_its_exception_propagates() -> None:
    def loop(stop: StopSignal) -> None:
        raise TransportError("boom")

    with pytest.raises(TransportError, match="boom"):
        await run_in_thread(loop)


async def test_cancelling_the_task_stops_and_joins_the_thread() -> None:
    ended = threading.Event()

    def loop(stop: StopSignal) -> None:
        try:
            assert wait_readable([], stop) is None
        finally:
            ended.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_in_thread, loop)
        await trio.sleep(0.05)
        assert not ended.is_set()
        nursery.cancel_scope.cancel()
    assert ended.is_set()  # the task ended only after the thread did


async def test_the_gil_switch_interval_is_lowered() -> None:
    previous = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        await run_in_thread(lambda stop: None)
        assert sys.getswitchinterval() == pytest.approx(LATENCY_SWITCH_INTERVAL)
    finally:
        sys.setswitchinterval(previous)


def test_read_into_waits_for_data_eof_and_stop() -> None:
    stop = StopSignal()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    with reader, writer:
        buffer = memoryview(bytearray(16))
        threading.Timer(0.02, writer.send, (b"hello",)).start()
        assert read_into(reader.fileno(), buffer, stop, what="x") == 5
        assert bytes(buffer[:5]) == b"hello"
        threading.Timer(0.02, stop.set).start()
        assert read_into(reader.fileno(), buffer, stop, what="x") is None
        assert stop.is_set()
        writer.shutdown(socket.SHUT_WR)
        fresh = StopSignal()
        assert read_into(reader.fileno(), buffer, fresh, what="x") == 0
        fresh.close()
    stop.close()


def test_write_all_waits_for_room_and_times_out() -> None:
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    with reader, writer:
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket holds

        def drain() -> None:
            time.sleep(0.05)
            got = bytearray()
            while len(got) < len(payload):
                got += reader.recv(1 << 16)
            assert got == payload

        thread = threading.Thread(target=drain)
        thread.start()
        assert write_all(
            writer.fileno(), [payload[:1000], payload[1000:]], timeout=5, what="x"
        ) == len(payload)
        thread.join()
        with pytest.raises(TransportError, match=r"took nothing for 0\.1 s"):
            write_all(writer.fileno(), [payload], timeout=0.1, what="the test channel")


def test_write_all_names_a_closed_peer() -> None:
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    reader.close()
    with writer, pytest.raises(TransportError, match=r"writing the path failed.*closed"):
        write_all(writer.fileno(), [b"x"], timeout=1, what="the path")


def test_thread_stream_looks_at_the_class_only() -> None:
    class Stream:
        def fileno(self) -> int:
            return 7

    class Proxy:
        def __init__(self, inner: object) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

    class Wrapper:
        def thread_stream(self) -> None:
            return None  # (TLS over a stream without a thread stream)

    found = thread_stream(Stream())
    assert type(found) is ThreadStream and found.fd == 7
    assert thread_stream(Proxy(Stream())) is None  # served through its own methods
    assert thread_stream(Wrapper()) is None
    assert thread_stream(object()) is None


async def test_an_urgent_thread_runs_at_a_higher_priority_where_allowed() -> None:
    import os

    def loop(stop: StopSignal) -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    tid, nice = await run_in_thread(loop, urgent=True)
    if os.geteuid() == 0:
        assert nice == URGENT_NICE
    # Given back afterwards: trio reuses its worker threads.
    assert os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0)
    assert (await run_in_thread(loop))[1] == os.getpriority(os.PRIO_PROCESS, 0)
