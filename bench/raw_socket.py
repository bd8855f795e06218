"""Raw transport baseline: SIZE bytes of distinct memory sent in WRITE-sized writes from this
process into an already-faulted region of a second process, over unix and tcp loopback.

    python bench/raw_socket.py [--size 1G] [--write 1M] [--transport unix,tcp]
                               [--api blocking,trimig,trimig-pages] [--repeat 3]

APIs: ``blocking`` is plain blocking sockets (sendall / recv_into), the floor any engine
pays; ``trimig`` is trimig's ByteStream (``send_buffers([1 MiB view])`` / ``receive_into``);
``trimig-pages`` is the same write as a gather of 4 KiB page views (what precopy sends).
The receiver times first byte to last byte; the figure is the receiver's throughput.
It then checks every byte arrived. ``--memory`` picks the receiver's memory: ``faulted``
(default: anonymous, every page faulted in first, the socket-and-copy limit), ``memfd`` (a
fresh shared memfd mapping, as trimig's destination blocks are: each 4 KiB shmem page is
allocated as it is first written) or ``anon`` (fresh anonymous memory with MADV_HUGEPAGE, as
QEMU allocates guest RAM). bench/vs_qemu.py uses ``run_receiver``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import trio

from trimig.transports import connect, listen
from trimig.units import parse_size

PAGE = 4096


def faulted_region(size: int) -> mmap.mmap:
    """Anonymous private memory with every page already faulted in."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    np.frombuffer(region, dtype=np.uint8)[::PAGE] = 1  # make sure, whatever the flags did
    return region


MEMORY_KINDS = ("faulted", "memfd", "anon")


def receiver_region(size: int, memory: str = "faulted") -> mmap.mmap:
    """The receiver's memory: ``faulted``, or fresh (``memfd``, ``anon``: see the docstring)."""
    if memory == "faulted":
        return faulted_region(size)
    if memory == "memfd":
        fd = os.memfd_create("raw-socket-bench")
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
    if memory == "anon":
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
        return region
    raise SystemExit(f"unknown --memory {memory!r}; choose one of {', '.join(MEMORY_KINDS)}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def distinct_words(size: int) -> np.ndarray:
    return np.arange(size // 8, dtype=np.uint64)


def blocking_address(transport: str, tmp: str) -> tuple[socket.socket, str]:
    if transport == "unix":
        path = os.path.join(tmp, "bench.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        return server, f"unix:{path}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server, f"tcp:127.0.0.1:{server.getsockname()[1]}"


def tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)


# -- receiver (child process) ---------------------------------------------------------------


def receive_blocking(
    transport: str, size: int, write: int, tmp: str, memory: str = "faulted"
) -> dict[str, float]:
    region = receiver_region(size, memory)
    view = memoryview(region)
    server, uri = blocking_address(transport, tmp)
    print(uri, flush=True)
    connection, _ = server.accept()
    cpu_start = cpu_seconds()
    tune(connection)
    have = 0
    start = 0.0
    while have < size:
        count = connection.recv_into(view[have : have + write])
        if count == 0:
            raise SystemExit("sender closed early")
        if have == 0:
            start = time.perf_counter()
        have += count
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    ok = np.array_equal(np.frombuffer(region, dtype=np.uint64), distinct_words(size))
    connection.close()
    server.close()
    view.release()
    return {"seconds": elapsed, "ok": float(ok), "cpu_s": cpu}


async def receive_trimig(transport: str, size: int, write: int, tmp: str) -> dict[str, float]:
    region = faulted_region(size)
    view = memoryview(region)
    uri = f"unix:{tmp}/bench.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    async with await listen(uri) as listener:
        print(listener.address.uri, flush=True)
        stream = await listener.accept()
        have = 0
        start = 0.0
        while have < size:
            count = await stream.receive_into(view[have : have + write])
            if count == 0:
                raise SystemExit("sender closed early")
            if have == 0:
                start = time.perf_counter()
            have += count
        elapsed = time.perf_counter() - start
        await stream.aclose()
    ok = np.array_equal(np.frombuffer(region, dtype=np.uint64), distinct_words(size))
    view.release()
    return {"seconds": elapsed, "ok": float(ok)}


# -- sender (this process) ------------------------------------------------------------------


def send_blocking(uri: str, region: memoryview, write: int) -> None:
    if uri.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(uri[len("unix:") :])
    else:
        host, _, port = uri[len("tcp:") :].rpartition(":")
        sock = socket.create_connection((host, int(port)))
    tune(sock)
    with sock:
        for offset in range(0, len(region), write):
            sock.sendall(region[offset : offset + write])


async def send_trimig(uri: str, region: memoryview, write: int, pages: bool) -> None:
    stream = await connect(uri)
    try:
        for offset in range(0, len(region), write):
            chunk = region[offset : offset + write]
            if pages:
                await stream.send_buffers([chunk[i : i + PAGE] for i in range(0, len(chunk), PAGE)])
            else:
                await stream.send_buffers([chunk])
        await stream.send_eof()
    finally:
        await stream.aclose()


def run_once(api: str, transport: str, region: memoryview, write: int) -> float:
    return len(region) / run_receiver(api, transport, region, write)["seconds"]


def run_receiver(
    api: str, transport: str, region: memoryview, write: int, memory: str = "faulted"
) -> dict[str, float]:
    """Send ``region`` from this process to a receiver process; the receiver's figures
    (``seconds`` first byte to last, ``cpu_s`` from accept to last byte with ``blocking``)."""
    size = len(region)
    command = [sys.executable, __file__, "--receive", api, transport, str(size), str(write)]
    command += ["--memory", memory]
    receiver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        uri = receiver.stdout.readline().strip()
        if api == "blocking":
            send_blocking(uri, region, write)
        else:
            trio.run(send_trimig, uri, region, write, api == "trimig-pages")
        result = json.loads(receiver.stdout.readline())
    finally:
        receiver.wait(timeout=60)
    if not result["ok"]:
        raise SystemExit(f"{api}/{transport}: the received bytes differ")
    result_figures: dict[str, float] = result
    return result_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--write", default="1M")
    parser.add_argument("--transport", default="unix,tcp")
    parser.add_argument("--api", default="blocking,trimig,trimig-pages")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--receive", nargs=4, metavar=("API", "TRANSPORT", "SIZE", "WRITE"))
    parser.add_argument(
        "--memory",
        choices=MEMORY_KINDS,
        default="faulted",
        help="the receiver's memory (blocking API): faulted, memfd or anon",
    )
    parser.add_argument("--json", action="store_true", help="print results as one JSON object")
    args = parser.parse_args()
    if args.receive:  # pragma: no cover - the child side
        api, transport, size, write = args.receive
        with tempfile.TemporaryDirectory(prefix="tmbench") as tmp:
            if api == "blocking":
                result = receive_blocking(transport, int(size), int(write), tmp, args.memory)
            else:
                result = trio.run(receive_trimig, transport, int(size), int(write), tmp)
        print(json.dumps(result), flush=True)
        return
    size, write = parse_size(args.size), parse_size(args.write)
    sender_memory = faulted_region(size)
    np.frombuffer(sender_memory, dtype=np.uint64)[:] = distinct_words(size)
    region = memoryview(sender_memory)
    results: dict[str, list[float]] = {}
    for transport in args.transport.split(","):
        for api in args.api.split(","):
            rates = [
                size / run_receiver(api, transport, region, write, args.memory)["seconds"]
                for _ in range(args.repeat)
            ]
            results[f"{transport}/{api}"] = rates
            best, median = max(rates), sorted(rates)[len(rates) // 2]
            if not args.json:
                print(
                    f"{transport:5} {api:13} {size >> 20} MiB in {write >> 10} KiB writes: "
                    f"median {median / 1e9:.2f} GB/s, best {best / 1e9:.2f} GB/s",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results))
    region.release()


if __name__ == "__main__":
    main()
