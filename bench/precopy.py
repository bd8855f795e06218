"""Precopy throughput against the raw socket-and-copy limit (a benchmark, not a test).

Run: python bench/precopy.py [--ram 1G] [--rounds 2] [--transports unix,tcp] [--json FILE]

One run, everything alternating, every figure from the same run (on these machines the first
touch of fresh memory swings by 3 to 5 times with what ran before, so figures from different
runs do not compare). A warm-up round runs first and is not reported.

Per round and transport (unix, tcp):

* ``raw``: the baseline. One process sends RAM bytes of distinct, already faulted memory in
  1 MiB ``send`` calls; another process receives them with ``recv_into`` straight into a
  region it has already faulted in (MADV_POPULATE_WRITE). Plain blocking sockets with the
  same SO_SNDBUF/SO_RCVBUF as trimig's transports. This is the socket-and-copy limit.
* ``migrate``: a paused guest (the workload guest, ``--fill random``: every page random but
  its 8-byte counter) migrated by the library API, source engine and destination engine in
  two separate processes (each guest in a third and fourth). ``prefaulted``: the
  destination engine's blocks are populated (MADV_POPULATE_WRITE) before it reads the
  stream, the same starting point as the raw receiver. ``fresh``: the destination writes
  into a fresh memfd, as a real migration does.

Then a zero-page pass, over unix: a guest whose RAM is all zero, once as never-touched holes
and once allocated (the source engine populates its memfds before the guest attaches), in
GB of guest RAM per second.

Timing. A migration is timed in the destination engine, from the moment it first reads
the stream to the moment it has read the last byte (the destination starts its own guest
process before it reads, which is excluded). Bytes the source had already pushed into the
socket by then (the destination's receive queue at its first read, SIOCINQ) are not counted,
so the figure errs low. The raw baseline is timed the same way. The zero-page stream is so
small that the socket holds all of it: there, the source's own time (connect to done) and
the destination's apply time are reported separately and the rate is the slower of the two.

CPU. Each side also reports its CPU time per GiB (the source over its whole run, setup
included; the destination from its first read on), the most stable figure on a shared
machine. The run starts and ends by measuring how much CPU two busy processes get
(``CPUs available``): 2.0 on an idle two-core machine, less when other work runs. Figures
are only comparable between runs with about as much CPU free.

Memory. Each engine process reports VmHWM (peak RSS) from /proc/self/status at the end.
The engine maps the guest's memfds, and every page of them the engine touches counts in
its RSS as RssShmem: that is guest RAM, not engine overhead. Shared pages only accumulate
while a migration runs, so ``VmHWM - RssShmem(at the end)`` bounds the engine's own peak
(anonymous + file) memory from above; that is the reported overhead. The target is at most
3% of guest RAM plus 64 MiB.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import json
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from typing import Any

RAW_WRITE = 1 << 20
CPU_SAMPLE = 32 << 20
TIMEOUT = 300.0


# --- helpers shared by the child processes ------------------------------------------------


def memory_status() -> dict[str, int]:
    """The VmHWM/VmRSS/RssAnon/RssFile/RssShmem lines of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far (cheaper than getrusage here)."""
    return time.process_time()


def queued_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    result = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, result)
    return result[0]


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def tune(sock: socket.socket) -> None:
    from trimig.transports.socket import SOCKET_BUFFER_SIZE

    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)


def parse_size(text: str) -> int:
    from trimig.units import parse_size as parse

    return parse(text, what="--ram")


# --- raw baseline -------------------------------------------------------------------------


def raw_receive(args: argparse.Namespace) -> None:
    size = parse_size(args.ram)
    region = mmap.mmap(-1, size)
    region.madvise(mmap.MADV_POPULATE_WRITE if hasattr(mmap, "MADV_POPULATE_WRITE") else 23)
    view = memoryview(region)
    if args.transport == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.address)
        listener.bind(args.address)
        address = args.address
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        host, port = listener.getsockname()
        address = f"{host}:{port}"
    listener.listen(1)
    emit({"address": address})
    connection, _ = listener.accept()
    tune(connection)
    if args.transport == "tcp":
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    have = 0
    first = 0.0
    queued = 0
    while have < size:
        if not have:
            # Wait for the first byte without reading it, as the engine does.
            connection.recv(1, socket.MSG_PEEK)
            queued = queued_bytes(connection.fileno())
            first = time.monotonic()
            cpu_first = cpu_seconds()
        got = connection.recv_into(view[have : have + RAW_WRITE])
        if not got:
            raise SystemExit(f"raw receiver: stream ended after {have} bytes")
        have += got
    end = time.monotonic()
    cpu = cpu_seconds() - cpu_first
    connection.close()
    del view
    region.close()
    emit({"first": first, "end": end, "bytes": size, "queued": queued, "cpu": cpu})


def raw_send(args: argparse.Namespace) -> None:
    import numpy as np

    size = parse_size(args.ram)
    region = mmap.mmap(-1, size)
    pages = np.frombuffer(region, dtype=np.uint64)
    pages[:] = np.arange(len(pages), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    del pages
    if args.transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tune(sock)
        sock.connect(args.address)
    else:
        host, port = args.address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tune(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, int(port)))
    view = memoryview(region)
    start = time.monotonic()
    cpu_start = cpu_seconds()
    for offset in range(0, size, RAW_WRITE):
        sock.sendall(view[offset : offset + RAW_WRITE])
    end = time.monotonic()
    cpu = cpu_seconds() - cpu_start
    sock.close()
    del view
    region.close()
    emit({"start": start, "end": end, "cpu": cpu})


# --- migration engines --------------------------------------------------------------------


class TimedStream:
    """A ByteStream that notes when the destination first reads and when the bytes end."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.first = 0.0
        self.last = 0.0
        self.queued = 0
        self.received = 0
        self.reads = 0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.cpu_bytes = 0  # bytes received when cpu_last was taken
        self.waiting = 0.0  # seconds spent in receive_into (waiting for and copying bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def receive_into(self, buffer: memoryview) -> int:
        if not self.received and not self.first:
            import trio

            await trio.lowlevel.wait_readable(self._stream.fileno())
            self.queued = queued_bytes(self._stream.fileno())
            self.first = time.monotonic()
            self.cpu_first = cpu_seconds()
        entered = time.monotonic()
        count: int = await self._stream.receive_into(buffer)
        self.waiting += time.monotonic() - entered
        if count:
            self.reads += 1
            before = self.received
            self.received += count
            self.last = time.monotonic()
            # Reading the process CPU clock is slow on these VMs: only every CPU_SAMPLE bytes.
            if before // CPU_SAMPLE != self.received // CPU_SAMPLE:
                self.cpu_last = cpu_seconds()
                self.cpu_bytes = self.received
        return count


def destination(args: argparse.Namespace) -> None:
    import trio

    from trimig.guest.host import workload_command
    from trimig.kernel.memory import MADV_POPULATE_WRITE
    from trimig.loadvm import incoming as incoming_module
    from trimig.loadvm.incoming import IncomingMigration
    from trimig.ram_blocks import RamBlock, RamBlockSpec, create_blocks
    from trimig.transports import listen

    specs = [RamBlockSpec("pc.ram", parse_size(args.ram))]
    if args.prefault:
        # Benchmark-only: the "already faulted" destination of the raw baseline. The blocks
        # are populated when IncomingMigration creates them, before it reads the stream.
        def prefaulted_blocks(specs: list[RamBlockSpec]) -> list[RamBlock]:
            blocks = create_blocks(specs)
            for block in blocks:
                block.mapping.madvise(MADV_POPULATE_WRITE)
            return blocks

        incoming_module.create_blocks = prefaulted_blocks  # type: ignore[attr-defined]

    async def main() -> dict[str, Any]:
        incoming = IncomingMigration(specs, guest_command=workload_command(fill=args.fill))
        listener = await listen(args.uri)
        emit({"address": str(listener.address)})
        async with listener:
            stream = TimedStream(await listener.accept())
        await incoming.run(stream)  # type: ignore[arg-type]
        verified = None
        guest, blocks = incoming.take_guest()
        try:
            if args.verify:
                await guest.stop()
                verified = (await guest.verify()).verified
            memory = memory_status()
        finally:
            await guest.aclose()
            for block in blocks:
                block.close()
        return {
            "first": stream.first,
            "end": stream.last,
            "bytes": stream.received,
            "queued": stream.queued,
            "cpu": (stream.cpu_last - stream.cpu_first) * stream.received / stream.cpu_bytes
            if stream.cpu_bytes
            else 0.0,  # a stream shorter than CPU_SAMPLE (the zero-page pass)
            "reads": stream.reads,
            "in_receive": stream.waiting,
            "verified": verified,
            **memory,
        }

    emit(trio.run(main))


def source(args: argparse.Namespace) -> None:
    import trio

    from trimig.guest.host import GuestProcess, workload_command
    from trimig.kernel.memory import MADV_POPULATE_WRITE
    from trimig.ram_blocks import RamBlockSpec, create_blocks
    from trimig.savevm.outgoing import OutgoingMigration

    specs = [RamBlockSpec("pc.ram", parse_size(args.ram))]

    async def main() -> dict[str, Any]:
        blocks = create_blocks(specs)
        try:
            if args.allocate:
                for block in blocks:
                    block.mapping.madvise(MADV_POPULATE_WRITE)
            guest = await GuestProcess.start(workload_command(fill=args.fill))
            try:
                await guest.attach(blocks, "new")  # paused: no cont
                before = memory_status()
                outgoing = OutgoingMigration(guest, blocks)
                start = time.monotonic()
                times_start = os.times()
                await outgoing.run(args.uri)
                end = time.monotonic()
                times_end = os.times()
                user = times_end.user - times_start.user
                system = times_end.system - times_start.system
                memory = memory_status()
                info = outgoing.query()
            finally:
                with trio.CancelScope(shield=True):
                    await guest.aclose()
        finally:
            for block in blocks:
                block.close()
        return {
            "start": start,
            "end": end,
            "cpu": user + system,
            "user": user,
            "system": system,
            "transferred": info["ram"]["transferred"],
            "rss_before": before["VmRSS"],
            **memory,
        }

    emit(trio.run(main))


# --- the driver ---------------------------------------------------------------------------


@contextlib.contextmanager
def child(*argv: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(TIMEOUT)
        raise SystemExit(f"child {process.args} exited with {process.returncode} and no result")
    result: dict[str, Any] = json.loads(line)
    return result


def rate(result: dict[str, Any]) -> float:
    """Bytes per second counted from the first read, minus what was queued by then."""
    return (result["bytes"] - result["queued"]) / (result["end"] - result["first"])


def run_raw(ram: str, transport: str, tmp: str) -> dict[str, Any]:
    address = os.path.join(tmp, "raw.sock")
    with child("_raw-receive", transport, ram, address) as receiver:
        address = read_json(receiver)["address"]
        with child("_raw-send", transport, ram, address) as sender:
            sent = read_json(sender)
            result = read_json(receiver)
    return {
        "rate": rate(result),
        "queued": result["queued"],
        "source_cpu": sent["cpu"],
        "dest_cpu": result["cpu"],
    }


def run_migration(
    ram: str,
    transport: str,
    tmp: str,
    *,
    fill: str = "random",
    prefault: bool = False,
    allocate: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    uri = "tcp:127.0.0.1:0"
    if transport == "unix":
        uri = f"unix:{os.path.join(tmp, 'migration.sock')}"
    dest_argv = ["_destination", uri, ram, "--fill", fill]
    dest_argv += ["--prefault"] * prefault + ["--verify"] * verify
    with child(*dest_argv) as dest:
        address = read_json(dest)["address"]
        src_argv = ["_source", address, ram, "--fill", fill] + ["--allocate"] * allocate
        with child(*src_argv) as src:
            sent = read_json(src)
            received = read_json(dest)
    size = parse_size(ram)
    if received["bytes"] != sent["transferred"]:
        raise SystemExit(f"sent {sent['transferred']} bytes but received {received['bytes']}")
    if verify and not received["verified"]:
        raise SystemExit("the destination guest did not verify")
    return {
        "rate": rate(received),
        "queued": received["queued"],
        "bytes": received["bytes"],
        "source_time": sent["end"] - sent["start"],
        "source_cpu": sent["cpu"],
        "source_user": sent["user"],
        "dest_cpu": received["cpu"],
        "dest_reads": received["reads"],
        "dest_in_receive": received["in_receive"],
        "dest_time": received["end"] - received["first"],
        "source_overhead": sent["VmHWM"] - sent["RssShmem"],
        "dest_overhead": received["VmHWM"] - received["RssShmem"],
        "source_hwm": sent["VmHWM"],
        "dest_hwm": received["VmHWM"],
        "source_shmem": sent["RssShmem"],
        "dest_shmem": received["RssShmem"],
        "guest_ram": size,
        "verified": received["verified"],
    }


def spin(seconds: float) -> None:
    """Busy-loop for ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def available_cpus() -> float:
    """How many CPUs two busy processes get together right now (2.0 on an idle 2-core box).

    Other work on the machine shows up here: every figure of a run is only comparable
    with figures taken while about as much CPU was free.
    """
    start = time.monotonic()
    processes = [subprocess.Popen([sys.executable, __file__, "_spin", "0.5"]) for _ in range(2)]
    for process in processes:
        process.wait()
    return 2 * 0.5 / (time.monotonic() - start)


def gb(value: float) -> str:
    return f"{value / 1e9:5.2f} GB/s"


def mib(value: float) -> str:
    return f"{value / 2**20:6.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", default="1G", help="guest RAM (and raw transfer) size")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after the warm-up")
    parser.add_argument("--transports", default="unix,tcp")
    parser.add_argument("--no-zero", action="store_true", help="skip the zero-page pass")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args()
    transports = args.transports.split(",")
    size = parse_size(args.ram)
    figures: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        figures.setdefault(name, []).append(result)

    cpus_before = available_cpus()
    print(f"CPUs available to two busy processes: {cpus_before:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="trimig-bench-") as tmp:
        print(f"warm-up ({args.ram}) ...", flush=True)
        for transport in transports:
            run_raw(args.ram, transport, tmp)
            run_migration(args.ram, transport, tmp, prefault=True, verify=True)
        for round_number in range(1, args.rounds + 1):
            for transport in transports:
                raw = run_raw(args.ram, transport, tmp)
                record(f"raw {transport}", raw)
                for prefault in (True, False):
                    kind = "prefaulted" if prefault else "fresh"
                    result = run_migration(args.ram, transport, tmp, prefault=prefault)
                    result["ratio"] = result["rate"] / raw["rate"]
                    record(f"migrate {transport} {kind}", result)
                    print(
                        f"round {round_number} {transport:4}: raw {gb(raw['rate'])} "
                        f"(cpu s/GiB {raw['source_cpu'] * 2**30 / size:.2f}/"
                        f"{raw['dest_cpu'] * 2**30 / size:.2f})  "
                        f"migration ({kind:10}) {gb(result['rate'])}  "
                        f"ratio {result['ratio']:.2f}  "
                        f"cpu s/GiB: source {result['source_cpu'] * 2**30 / size:.2f} "
                        f"(user {result['source_user'] * 2**30 / size:.2f}) "
                        f"destination {result['dest_cpu'] * 2**30 / size:.2f} "
                        f"(in receive {result['dest_in_receive'] / result['dest_time']:.0%})  "
                        f"source +{mib(result['source_overhead'])}  "
                        f"destination +{mib(result['dest_overhead'])}",
                        flush=True,
                    )
        if not args.no_zero:
            for round_number in range(1, args.rounds + 1):
                for allocate in (False, True):
                    kind = "allocated" if allocate else "holes"
                    result = run_migration(args.ram, "unix", tmp, fill="zero", allocate=allocate)
                    result["zero_rate"] = size / max(result["source_time"], result["dest_time"])
                    record(f"zero {kind}", result)
                    print(
                        f"round {round_number} zero {kind:9}: "
                        f"{gb(result['zero_rate'])} of guest RAM "
                        f"(source {result['source_time'] * 1e3:.0f} ms, "
                        f"destination {result['dest_time'] * 1e3:.0f} ms, "
                        f"{result['bytes']} stream bytes)  "
                        f"source +{mib(result['source_overhead'])}  "
                        f"destination +{mib(result['dest_overhead'])}",
                        flush=True,
                    )

    cpus_after = available_cpus()
    budget = 0.03 * size + (64 << 20)
    print(
        f"\nsummary ({args.ram} guest, best of {args.rounds}; memory: worst; "
        f"CPUs available before/after: {cpus_before:.2f}/{cpus_after:.2f})"
    )
    for name, results in figures.items():
        if name.startswith("raw"):
            print(f"  {name:28} {gb(max(r['rate'] for r in results))}")
        elif name.startswith("migrate"):
            best = max(results, key=lambda r: r["rate"])
            source = max(r["source_overhead"] for r in results)
            destination = max(r["dest_overhead"] for r in results)
            print(
                f"  {name:28} {gb(best['rate'])}  ratio {best['ratio']:.2f} (target 0.75)  "
                f"peak overhead: source {mib(source)}, destination {mib(destination)} "
                f"(budget {mib(budget)})"
            )
        else:
            best = max(results, key=lambda r: r["zero_rate"])
            print(f"  {name:28} {gb(best['zero_rate'])} (target 6 GB/s)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpus": [cpus_before, cpus_after], **figures}, out, indent=1)


def child_main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    receive = sub.add_parser("_raw-receive")
    send = sub.add_parser("_raw-send")
    for raw in (receive, send):
        raw.add_argument("transport")
        raw.add_argument("ram")
        raw.add_argument("address")
    spinner = sub.add_parser("_spin")
    spinner.add_argument("seconds", type=float)
    dest = sub.add_parser("_destination")
    src = sub.add_parser("_source")
    for engine in (dest, src):
        engine.add_argument("uri")
        engine.add_argument("ram")
        engine.add_argument("--fill", default="random")
    dest.add_argument("--prefault", action="store_true")
    dest.add_argument("--verify", action="store_true")
    src.add_argument("--allocate", action="store_true")
    args = parser.parse_args()
    handler = {
        "_raw-receive": raw_receive,
        "_raw-send": raw_send,
        "_destination": destination,
        "_source": source,
        "_spin": lambda args: spin(args.seconds),
    }[args.role]
    handler(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        child_main()
    else:
        main()
