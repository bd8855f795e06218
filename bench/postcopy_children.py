"""The processes bench/postcopy.py runs as itself with an internal role: the benchmark's
guest (``_guest``), the destination and source engines (``_destination``, ``_source``: the
library API, each reporting its figures as one JSON line) and the floor's faulting child
(``_floor``). trimig is imported inside each (after bench/postcopy.py's trace hook)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

import numpy as np

#: The script these roles are subcommands of.
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "postcopy.py")
PAGE_SIZE = 4096
MAX_TOUCHES = 4000
"""The guest's latencies travel in its verify reply (one 64 KiB packet)."""


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# --- the guest --------------------------------------------------------------------------------


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


def guest_options(args: argparse.Namespace) -> list[str]:
    """The guest's options, as the ``_guest`` role (and the engine roles) take them."""
    return [
        "--seed",
        str(args.seed),
        "--sweep-rate",
        args.sweep_rate,
        "--touches",
        str(args.touches),
        "--touch-interval",
        str(args.touch_interval),
    ]


def guest_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, SCRIPT, "_guest", *guest_options(args)]


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


# --- the floor's faulting child ---------------------------------------------------------------


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


# --- CPU time ---------------------------------------------------------------------------------


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
