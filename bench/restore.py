"""Restore from a snapshot file: lazy against eager (a benchmark, not a test).

Run: python bench/restore.py [--ram 1G] [--rounds 3] [--cold] [--json FILE]

One run: a running guest of --ram (the workload guest, random fill, sweeping its page
counters at 256 MB/s) is saved live to a file with mapped-ram (``trimig snapshot``'s
path: precopy passes to the file, the guest stops for the last one); then it is restored
--rounds times each way, alternating eager and lazy, into a fresh guest process that
sweeps as fast as it can (``--dirty-rate max``: its first step touches 512 pages at
once, and it goes on faulting while the lazy fill runs). After every restore the guest
is stopped and verifies every page (counters and the whole random fill); a failed
verification fails the benchmark. With --cold the file's pages are dropped from the page
cache (fsync, then POSIX_FADV_DONTNEED on that file only) before each restore.

Definitions (all CLOCK_MONOTONIC, one clock for both processes):

* **restore start**: ``Restore.run`` entered, before the file is opened. The guest process
  is already running and idle (as QEMU's ``-incoming``); its start-up is not counted and
  is reported apart (``spawn``).
* **time to first step** (TTFS): restore start to the start of the guest's first step
  after ``cont``, as the guest reports it (``x-first-step.start-ns`` of its ``query``).
  That step is the first thing the guest executes after the restore: the first
  instruction. ``first step done`` is when it returned (its 512 pages faulted in).
* **total**: restore start to every page in place (eager: read before ``cont``; lazy:
  the fill thread's end).
* **fault latency** (lazy): the FaultHandler's request-to-placement latency of every
  fault (p50, p99 over all of a restore's faults), their number, and blocktime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import trio

from trimig._trio import open_nursery
from trimig.demo import running_guest
from trimig.guest.host import GuestProcess, workload_command
from trimig.migration import MigrationCapabilities
from trimig.ram_blocks import default_block_specs
from trimig.savevm.outgoing import OutgoingMigration
from trimig.snapshot.restore import Restore
from trimig.units import parse_size


async def save(path: str, ram: int) -> dict[str, Any]:
    specs = default_block_specs(ram)
    capabilities = MigrationCapabilities()
    capabilities.set("mapped-ram", True)
    async with running_guest(specs, workload_command(dirty_rate="256M")) as (guest, blocks):
        await trio.sleep(1.0)
        outgoing = OutgoingMigration(guest, blocks, capabilities=capabilities)
        await outgoing.run(f"file:{path}")
        return outgoing.query()


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def restore_once(path: str, ram: int, lazy: bool) -> dict[str, Any]:
    specs = default_block_specs(ram)
    spawn_start = time.monotonic_ns()
    guest = await GuestProcess.start(workload_command(dirty_rate="max"))
    spawn_ms = (time.monotonic_ns() - spawn_start) / 1e6
    restore = Restore(path, specs, guest, lazy=lazy)
    try:
        async with open_nursery() as nursery:
            await nursery.start(restore.run)
        info = await restore.report()
        await guest.stop()
        verdict = await guest.verify()
        if not verdict.verified:
            raise SystemExit(f"restore ({info['mode']}) did not verify: {verdict.detail}")
        info["spawn-ms"] = round(spawn_ms, 1)
        return info
    finally:
        with trio.CancelScope(shield=True):
            await guest.aclose()
        restore.close()


def summary(runs: list[dict[str, Any]], key: str, scale: float = 1.0) -> str:
    values = [run[key] * scale for run in runs if key in run]
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ram = parse_size(args.ram, what="--ram")
    with tempfile.TemporaryDirectory(prefix="trimig-bench-", dir=args.dir) as directory:
        path = os.path.join(directory, "guest.snap")
        saved = await save(path, ram)
        print(
            f"saved {args.ram} to {path}: {os.path.getsize(path) >> 20} MiB file, "
            f"{saved['total-time']} ms, downtime {saved['downtime']} ms, "
            f"{saved['ram']['dirty-sync-count']} passes",
            flush=True,
        )
        results: dict[str, list[dict[str, Any]]] = {"eager": [], "lazy": []}
        for round_number in range(args.rounds):
            for lazy in (False, True):
                if args.cold:
                    drop_cache(path)
                info = await restore_once(path, ram, lazy)
                results[info["mode"]].append(info)
                print(
                    f"round {round_number + 1} {info['mode']:5}: first step "
                    f"{info.get('x-time-to-first-step-ms')} ms, total {info['total-time']} ms"
                    + (
                        f", {info['postcopy-requests']} faults p50 "
                        f"{info['x-postcopy-latency-p50'] / 1e3:.0f} us p99 "
                        f"{info['x-postcopy-latency-p99'] / 1e3:.0f} us"
                        if lazy
                        else ""
                    ),
                    flush=True,
                )
    print()
    print(f"{'':6} {'first step ms':>22} {'first step done ms':>22} {'total ms':>24}")
    for mode, runs in results.items():
        print(
            f"{mode:6} {summary(runs, 'x-time-to-first-step-ms'):>22} "
            f"{summary(runs, 'x-first-step-done-ms'):>22} {summary(runs, 'total-time'):>24}"
        )
    lazy_runs = results["lazy"]
    print(
        f"lazy faults: {summary(lazy_runs, 'postcopy-requests')} per restore, latency p50 "
        f"{summary(lazy_runs, 'x-postcopy-latency-p50', 1e-3)} us, p99 "
        f"{summary(lazy_runs, 'x-postcopy-latency-p99', 1e-3)} us, blocktime "
        f"{summary(lazy_runs, 'postcopy-blocktime')} ms"
    )
    return {"ram": args.ram, "cold": args.cold, "saved": saved, **results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache")
    parser.add_argument("--dir", default=None, help="where the snapshot file goes (default /tmp)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    arguments = parser.parse_args()
    report = trio.run(main, arguments)
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump(report, file, indent=1)
