"""Postcopy fault latency, switchover downtime and total time (a benchmark, not a test).

Run: python bench/postcopy.py [--ram 1G] [--rounds 3] [--transports unix,tcp] [--json FILE]

Everything in one run, rounds alternating between the transports; a warm-up migration
runs first and is not reported.

``floor``: the bare userfaultfd round trip. A child process maps a shmem memfd,
registers it for MISSING faults and hands the uffd to this process, then reads one
word of random pages one at a time; this process waits in poll(), reads each fault
and resolves it with UFFDIO_COPY. The child times each access (``guest``: fault,
wake-up of the resolver, copy, wake-up of the child); the resolver times read to
copied (``resolver``). Nothing else runs meanwhile. This is the floor of a postcopy
fault: everything a migration adds is network, scheduling and bookkeeping.

``migrate``: a running guest of --ram (the workload guest with its random fill,
sweeping its counters at --sweep-rate, see below) migrated back to back: postcopy is
requested as soon as the migration starts, so the source switches before it sends any
page and all of RAM moves in postcopy, the background stream at full speed.
The source and destination engines are two processes (the library API; each guest in
a process of its own). Right after the switch the destination guest reads one word of
--touches random pages, --touch-interval apart, timing each read.

Figures (per migration; the report gives the median and the range over the rounds):

* latency p50/p99: the destination's own latency data (request recorded to page
  placed, ``x-postcopy-latency-p50/p99``), over every fault of the migration;
* guest p50/p99: the guest's view of its random reads of pages that were missing
  (``mincore`` said so just before), pooled over the rounds: fault to wake-up, the same
  span as the floor's ``guest``;
* blocktime: ``postcopy-blocktime`` of the destination (time with a fault outstanding),
  with the number of faults it served;
* downtime: the source's ``downtime`` (guest stopped to the destination's PONG after
  the package, i.e. the guest runs there), and the part of it QEMU calls downtime
  in postcopy (``stop_to_package``: guest stopped to package sent);
* total: the source's total time (migrate to completed, SHUT received).

The destination guest is verified after each migration (counters and the whole random
fill); a failed verification fails the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

TIMEOUT = 300.0
PAGE_SIZE = 4096
MAX_TOUCHES = 4000
"""The guest's latencies travel in its verify reply (one 64 KiB packet)."""


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def percentiles(values: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50/p99 (nearest rank) and max of nanosecond values, in µs."""
    array = np.asarray(values, dtype=np.int64)
    if not len(array):
        return {"count": 0}
    p50, p99 = np.percentile(array, (50, 99), method="inverted_cdf")
    return {
        "count": len(array),
        "p50_us": round(float(p50) / 1000, 1),
        "p99_us": round(float(p99) / 1000, 1),
        "max_us": round(float(array.max()) / 1000, 1),
    }


# --- the guest ------------------------------------------------------------------------------


def guest(args: argparse.Namespace) -> int:
    """The benchmark's guest: the workload guest, plus timed reads of random pages that
    start when it first runs as a postcopy destination. Only the reads of pages that were
    not in memory (mincore) are kept: those are the ones the engine has to bring."""
    import cffi

    from trimig.guest import Guest, Role, VerifyResult
    from trimig.guest.workload import WORDS_PER_PAGE, Workload
    from trimig.units import parse_rate

    ffi = cffi.FFI()
    ffi.cdef("int mincore(void *addr, size_t length, unsigned char *vec);")
    libc = ffi.dlopen(None)
    residency = ffi.new("unsigned char[1]")

    def resident(address: int) -> bool:
        if libc.mincore(ffi.cast("void *", address), PAGE_SIZE, residency):
            raise OSError(ffi.errno, "mincore failed")
        return bool(residency[0] & 1)

    class TouchingWorkload(Workload):
        def __init__(self) -> None:
            sweep_rate = parse_rate(args.sweep_rate, what="--sweep-rate")
            super().__init__(dirty_rate=sweep_rate, seed=args.seed)
            self.sweep = sweep_rate > 0
            self.touches = min(args.touches, MAX_TOUCHES)
            self.interval = args.touch_interval
            self.latencies = np.zeros(self.touches, dtype=np.int64)
            self.done = 0
            self.faulted = 0
            self.next_touch = 0.0
            self.role: Role | None = None
            self.words: list[np.ndarray] = []
            self.addresses: list[int] = []
            self.rng = np.random.default_rng(args.seed + 1)

        def on_attach(self, guest: Guest, role: Role) -> None:
            super().on_attach(guest, role)
            self.role = role
            self.words = [block.array("<u8")[::WORDS_PER_PAGE] for block in guest.blocks]
            self.addresses = [block.address for block in guest.blocks]

        def step(self) -> float | None:
            wait = super().step() if self.sweep else 0.05
            if self.role is not Role.POSTCOPY or self.done >= self.touches:
                return wait
            now = time.monotonic()
            if now >= self.next_touch:
                index = int(self.rng.integers(len(self.words)))
                block = self.words[index]
                page = int(self.rng.integers(len(block)))
                missing = not resident(self.addresses[index] + page * PAGE_SIZE)
                start = time.perf_counter_ns()
                int(block[page])
                if missing:
                    self.latencies[self.faulted] = time.perf_counter_ns() - start
                    self.faulted += 1
                self.done += 1
                self.next_touch = now + self.interval
                return None
            return min(wait or 0.0, self.next_touch - now)

        def verify(self) -> VerifyResult:
            result = super().verify()
            touches = self.latencies[: self.faulted].tolist()
            fields = {**result.fields, "touch_ns": touches, "touches": self.done}
            return VerifyResult(result.verified, result.detail, fields)

    connection = Guest.connect()
    try:
        return connection.run(TouchingWorkload())
    finally:
        connection.close()


def guest_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "_guest",
        "--seed",
        str(args.seed),
        "--sweep-rate",
        args.sweep_rate,
        "--touches",
        str(args.touches),
        "--touch-interval",
        str(args.touch_interval),
    ]


# --- the engines ------------------------------------------------------------------------------


def capabilities() -> Any:
    from trimig.migration import MigrationCapabilities

    caps = MigrationCapabilities()
    caps.set("postcopy-ram", True)
    caps.set("postcopy-preempt", True)
    return caps


def destination(args: argparse.Namespace) -> None:
    import trio

    from trimig.loadvm.incoming import IncomingMigration
    from trimig.migration import MigrationStatus
    from trimig.ram_blocks import default_block_specs
    from trimig.units import parse_size

    async def main() -> dict[str, Any]:
        specs = default_block_specs(parse_size(args.ram, what="--ram"))
        incoming = IncomingMigration(
            specs, guest_command=guest_command(args), capabilities=capabilities()
        )
        try:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(incoming.listen_and_run, args.uri)
                cpu_before = own_cpu_seconds()
                emit({"address": address})
            cpu = own_cpu_seconds() - cpu_before
            if incoming.status.value is not MigrationStatus.COMPLETED:
                return {"error": incoming.query().get("error-desc", "not completed")}
            guest, blocks = incoming.take_guest()
            try:
                await trio.sleep(args.run_after)
                await guest.stop()
                verdict = await guest.verify(timeout=120)
            finally:
                with trio.CancelScope(shield=True):
                    await guest.aclose()
                for block in blocks:
                    block.close()
            return {"incoming": incoming.query(), "verdict": verdict.raw, "cpu_s": cpu}
        finally:
            await incoming.aclose()

    emit(trio.run(main))


def source(args: argparse.Namespace) -> None:
    import trio

    from trimig.demo import running_guest
    from trimig.migration import MigrationParameters, MigrationStatus
    from trimig.ram_blocks import default_block_specs
    from trimig.savevm.outgoing import OutgoingMigration
    from trimig.units import parse_size

    async def main() -> dict[str, Any]:
        specs = default_block_specs(parse_size(args.ram, what="--ram"))
        async with running_guest(specs, guest_command(args)) as (guest, blocks):
            await trio.sleep(args.warmup)
            parameters = MigrationParameters()
            parameters.set("max-postcopy-bandwidth", args.postcopy_bandwidth)
            package_ns = 0

            def on_event(name: str, data: dict[str, Any]) -> None:
                nonlocal package_ns
                if data.get("status") == "postcopy-device":  # set as the package goes out
                    package_ns = time.monotonic_ns()

            outgoing = OutgoingMigration(
                guest,
                blocks,
                capabilities=capabilities(),
                parameters=parameters,
                on_event=on_event,
            )

            async def switch_at_once() -> None:
                # migrate, then migrate-start-postcopy straight away (QEMU's back to back)
                await outgoing.status.wait_value(lambda status: status is not MigrationStatus.NONE)
                outgoing.start_postcopy()

            busy_before, cpu_before = busy_cpu_seconds(), own_cpu_seconds()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(switch_at_once)
                await outgoing.run(args.uri)
            stats = outgoing.stats
            return {
                "source": outgoing.query(),
                "total_us": (stats.end_ns - stats.start_ns) // 1000,
                "stop_to_package_us": (package_ns - stats.downtime_start_ns) // 1000,
                "machine_cpu_s": busy_cpu_seconds() - busy_before,
                "cpu_s": own_cpu_seconds() - cpu_before,
            }

    emit(trio.run(main))


# --- the floor ----------------------------------------------------------------------------------


def floor_child(args: argparse.Namespace) -> None:
    """Fault ``--faults`` random pages of the memfd, timing each; send the times back."""
    from trimig.kernel.memory import Mapping
    from trimig.kernel.uffd import Feature, Mode, Userfaultfd

    control = socket.socket(fileno=args.control)
    mapping = Mapping(args.memfd, args.size)
    uffd = Userfaultfd.create()
    uffd.api(Feature.MISSING_SHMEM)
    uffd.register(mapping.address, args.size, Mode.MISSING)
    socket.send_fds(control, [b"uffd"], [uffd.fileno()])
    uffd.close()
    words = np.frombuffer(mapping.buffer, dtype="<u8")[::512]
    pages = np.random.default_rng(7).permutation(len(words))[: args.faults]
    latencies = np.zeros(len(pages), dtype=np.int64)
    for index, page in enumerate(pages.tolist()):
        start = time.perf_counter_ns()
        int(words[page])
        latencies[index] = time.perf_counter_ns() - start
    control.send(latencies.tobytes())
    del words
    mapping.close()


def measure_floor(faults: int) -> dict[str, Any]:
    """The bare uffd round trip: a child faults, this process resolves with UFFDIO_COPY."""
    from trimig.kernel.memory import memfd_create
    from trimig.kernel.uffd import Userfaultfd

    size = faults * PAGE_SIZE * 2
    memfd = memfd_create("trimig-bench-floor")
    os.ftruncate(memfd, size)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    source = np.frombuffer(np.random.default_rng(1).bytes(PAGE_SIZE), dtype=np.uint8).copy()
    source_address = source.__array_interface__["data"][0]
    resolver: list[int] = []
    child = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "_floor",
            "--memfd",
            str(memfd),
            "--control",
            str(theirs.fileno()),
            "--size",
            str(size),
            "--faults",
            str(faults),
        ],
        pass_fds=(memfd, theirs.fileno()),
    )
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        with Userfaultfd.from_fd(fds[0]) as uffd:
            poller = select.poll()
            poller.register(uffd.fileno(), select.POLLIN)
            poller.register(ours.fileno(), select.POLLIN)
            while True:
                ready = {fd for fd, _ in poller.poll(TIMEOUT * 1000)}
                if uffd.fileno() in ready:
                    for fault in uffd.read_faults():
                        start = time.perf_counter_ns()
                        page = fault.address // PAGE_SIZE * PAGE_SIZE
                        uffd.copy(page, source_address, PAGE_SIZE)
                        resolver.append(time.perf_counter_ns() - start)
                elif ours.fileno() in ready:
                    guest = np.frombuffer(ours.recv(faults * 8 + 8), dtype=np.int64)
                    break
                else:
                    raise SystemExit("floor: the faulting child went silent")
    finally:
        child.wait(TIMEOUT)
        ours.close()
        os.close(memfd)
    return {"guest": percentiles(guest), "resolver": percentiles(resolver)}


# --- the driver -----------------------------------------------------------------------------------


@contextlib.contextmanager
def child(*argv: str, profile: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """Run this script with ``argv``; with ``profile`` (a file), under py-spy (raw stacks)."""
    command = [sys.executable, os.path.abspath(__file__), *argv]
    if profile:
        command = [
            "py-spy",
            "record",
            "--nonblocking",
            "--rate",
            "1000",
            "--format",
            "raw",
            "--output",
            profile,
            "--",
            *command,
        ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        yield process
        process.wait(TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    while line and not line.startswith("{"):  # py-spy's own output
        line = process.stdout.readline()
    if not line:
        raise SystemExit(f"benchmark child {process.args!r} exited with {process.wait()}")
    result: dict[str, Any] = json.loads(line)
    return result


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat), in seconds."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process so far."""
    times = os.times()
    return times.user + times.system


def migrate_once(
    args: argparse.Namespace, transport: str, workdir: str, tag: str = ""
) -> dict[str, Any]:
    """One postcopy migration between two engine processes; its figures."""
    profiles: dict[str, str | None] = {"source": None, "destination": None}
    if args.profile and tag:
        os.makedirs(args.profile, exist_ok=True)
        profiles = {side: f"{args.profile}/{tag}-{side}.txt" for side in profiles}
    common = [
        "--ram",
        args.ram,
        "--seed",
        str(args.seed),
        "--sweep-rate",
        args.sweep_rate,
        "--touches",
        str(args.touches),
        "--touch-interval",
        str(args.touch_interval),
    ]
    listen = f"unix:{workdir}/migration.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    with child(
        "_destination",
        "--uri",
        listen,
        "--run-after",
        str(args.run_after),
        *common,
        profile=profiles["destination"],
    ) as receiver:
        address = read_json(receiver)["address"]
        with child(
            "_source",
            "--uri",
            address,
            "--warmup",
            str(args.warmup),
            "--postcopy-bandwidth",
            args.postcopy_bandwidth,
            *common,
            profile=profiles["source"],
        ) as sender:
            sent = read_json(sender)
        received = read_json(receiver)
    if "error" in received:
        raise SystemExit(f"{transport}: the destination failed: {received['error']}")
    incoming, verdict = received["incoming"], received["verdict"]
    if not verdict.get("verified"):
        raise SystemExit(
            f"{transport}: the destination guest failed verification: {verdict.get('detail')}"
        )
    info = sent["source"]
    touches = verdict.get("touch_ns", [])
    return {
        # (NaN from an engine without the percentiles: an older trimig on PYTHONPATH)
        "latency_p50_us": incoming.get("x-postcopy-latency-p50", float("nan")) / 1000,
        "latency_p99_us": incoming.get("x-postcopy-latency-p99", float("nan")) / 1000,
        "latency_avg_us": incoming["postcopy-latency"] / 1000,
        "requests": incoming["postcopy-requests"],
        "blocktime_ms": incoming["postcopy-blocktime"],
        "downtime_ms": info["downtime-us"] / 1000,
        "stop_to_package_ms": sent["stop_to_package_us"] / 1000,
        "total_ms": sent["total_us"] / 1000,
        "transferred_mib": round(info["ram"]["transferred"] / 2**20, 1),
        "source_cpu_s": round(sent["cpu_s"], 2),
        "destination_cpu_s": round(received["cpu_s"], 2),
        # What the rest of the machine used meanwhile (guests included): other work
        # disturbs every figure here.
        "other_cpu_s": round(
            max(sent["machine_cpu_s"] - sent["cpu_s"] - received["cpu_s"], 0.0), 2
        ),
        "guest_faults_ns": touches,
    }


SUMMARY = (
    "latency_p50_us",
    "latency_p99_us",
    "latency_avg_us",
    "requests",
    "blocktime_ms",
    "downtime_ms",
    "stop_to_package_ms",
    "total_ms",
    "transferred_mib",
    "source_cpu_s",
    "destination_cpu_s",
    "other_cpu_s",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in SUMMARY:
        values = [run[key] for run in runs]
        summary[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values)}
    summary["guest"] = percentiles([ns for run in runs for ns in run["guest_faults_ns"]])
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the benchmark (default)")
    for target in (parser, run):
        target.add_argument("--rounds", type=int, default=3)
        target.add_argument("--transports", default="unix,tcp")
        target.add_argument("--floor-faults", type=int, default=2000)
        target.add_argument("--json", metavar="FILE", help="also write the results here")
        target.add_argument(
            "--profile", metavar="DIR", help="run the engines under py-spy, raw stacks into DIR"
        )
    internal = {name: sub.add_parser(name) for name in ("_guest", "_destination", "_source")}
    for name, target in (*internal.items(), ("run", run), ("", parser)):
        target.add_argument("--ram", default="1G")
        target.add_argument("--seed", type=int, default=1)
        target.add_argument(
            "--sweep-rate", default="16M", help="the guest's counter sweep, bytes/s (0: none)"
        )
        target.add_argument(
            "--touches",
            type=int,
            default=128,
            help="random pages the destination guest reads after the switch",
        )
        target.add_argument(
            "--touch-interval", type=float, default=0.002, help="seconds between those reads"
        )
        if name in ("_destination", "_source"):
            target.add_argument("--uri", required=True)
        if name in ("_destination", "run", ""):
            target.add_argument("--run-after", type=float, default=0.2)
        if name in ("_source", "run", ""):
            target.add_argument("--warmup", type=float, default=0.3)
            target.add_argument(
                "--postcopy-bandwidth",
                default="0",
                help="max-postcopy-bandwidth of the source (default 0: unlimited)",
            )
    floor = sub.add_parser("_floor")
    for option in ("--memfd", "--control", "--size", "--faults"):
        floor.add_argument(option, type=int, required=True)
    args = parser.parse_args(argv)

    if args.role == "_guest":
        raise SystemExit(guest(args))
    if os.environ.get("TRIMIG_BENCH_TRACE"):
        import atexit

        import trimig.trace

        records: list[tuple[int, str, dict[str, object]]] = []

        def remember(event: str, **fields: object) -> None:
            records.append((time.monotonic_ns(), event, fields))

        def dump() -> None:
            with open(f"{os.environ['TRIMIG_BENCH_TRACE']}.{args.role}", "a") as out:
                for stamp, event, fields in records:
                    details = " ".join(f"{key}={value}" for key, value in fields.items())
                    out.write(f"{stamp / 1e9:.6f} {event} {details}\n")

        trimig.trace.trace = remember  # before the engine modules import it
        atexit.register(dump)
    if args.role == "_destination":
        return destination(args)
    if args.role == "_source":
        return source(args)
    if args.role == "_floor":
        return floor_child(args)

    transports = [name.strip() for name in args.transports.split(",") if name.strip()]
    results: dict[str, Any] = {
        "ram": args.ram,
        "touches": args.touches,
        "floor": [],
        "migrations": {name: [] for name in transports},
    }
    with tempfile.TemporaryDirectory(prefix="trimig-bench-") as workdir:
        print(f"warm-up migration over {transports[0]} ...", file=sys.stderr, flush=True)
        migrate_once(args, transports[0], workdir)
        for round_index in range(args.rounds):
            floor_result = measure_floor(args.floor_faults)
            results["floor"].append(floor_result)
            print(
                f"round {round_index + 1}: floor {json.dumps(floor_result)}",
                file=sys.stderr,
                flush=True,
            )
            for transport in transports:
                run_result = migrate_once(args, transport, workdir, f"{transport}{round_index}")
                results["migrations"][transport].append(run_result)
                shown = {k: v for k, v in run_result.items() if k != "guest_faults_ns"}
                print(
                    f"round {round_index + 1}: {transport} {json.dumps(shown)}",
                    file=sys.stderr,
                    flush=True,
                )
    results["summary"] = {name: summarise(runs) for name, runs in results["migrations"].items()}
    floor_guest = [run["guest"] for run in results["floor"]]
    results["summary"]["floor"] = {
        key: float(np.median([entry[key] for entry in floor_guest])) for key in ("p50_us", "p99_us")
    }
    print(json.dumps(results["summary"], indent=2))
    if args.json:
        with open(args.json, "w") as output:
            json.dump(results, output, indent=2)


if __name__ == "__main__":
    main()
