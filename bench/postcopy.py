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

The processes it starts (the guest, the two engines, the floor's child) are
bench/postcopy_children.py's, run as this script's internal subcommands.
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
from postcopy_children import PAGE_SIZE, destination, floor_child, guest, guest_options, source

TIMEOUT = 300.0


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


# --- the floor ----------------------------------------------------------------------------------


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


def migrate_once(
    args: argparse.Namespace, transport: str, workdir: str, tag: str = ""
) -> dict[str, Any]:
    """One postcopy migration between two engine processes; its figures."""
    profiles: dict[str, str | None] = {"source": None, "destination": None}
    if args.profile and tag:
        os.makedirs(args.profile, exist_ok=True)
        profiles = {side: f"{args.profile}/{tag}-{side}.txt" for side in profiles}
    common = ["--ram", args.ram, *guest_options(args)]
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
