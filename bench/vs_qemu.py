"""trimig against QEMU 7.2, side by side, on the paths users run: the benchmark that decides.

    python3 bench/vs_qemu.py [--ram 1G] [--rounds 3] [--json FILE] [--dirty-rate 256M]
                             [--cases precopy-unix,precopy-tcp,postcopy-unix] [--no-extra]

One run alternates, after a warm-up, QEMU (``qemu-system-x86_64``), trimig (two ``trimig run``
engines) and the raw socket limit, case by case, round by round, with fresh engines (and so
fresh destinations) for every migration. QEMU and trimig are driven by the same client
(``qemu.qmp``'s QMPClient) with the same sequence:

    migrate-set-capabilities (events; postcopy-ram and postcopy-preempt for postcopy), on both
    migrate-set-parameters max-bandwidth 100 GiB/s, on both
    migrate-incoming URI on the destination (tcp: port 0, the real one from its query-migrate)
    migrate URI on the source; for postcopy migrate-start-postcopy right after it
    query-migrate on the source every 10 ms until it ends, then on the destination

Cases: ``precopy-unix`` and ``precopy-tcp`` with an idle guest, ``postcopy-unix`` (or -tcp)
with a running guest dirtying ``--dirty-rate`` bytes/s. ``precopy-tls-tcp`` (and
``postcopy-tls-tcp``): the same over TLS, set up the same way on both engines:

    object-add qom-type=tls-creds-x509 id=tls0 dir=DIR verify-peer=true, endpoint server on
    the destination and client on the source (trustme certificates in QEMU's file names,
    tests/tls_certs.py); migrate-set-parameters tls-creds=tls0 on both, tls-hostname
    localhost on the source

and, where the plaintext case ran too (``--cases precopy-tcp,precopy-tls-tcp``), the table
adds each engine's TLS / plaintext throughput ratio.

Guests: ``--ram`` (1 GiB). QEMU: ``-M pc -accel tcg -m RAM -nodefaults``, no disk, no kernel:
the firmware is bench/qemu_guest.S (a 64 KiB -bios that enters protected mode and, on each
tick of a 1 kHz PIT, increments a byte in each of the next N pages of its RAM, halting
between ticks; N 0 for the idle guest), and the source's RAM holds RAM - 64 MiB of random
bytes first (``-device loader`` of a random file at 1 MiB), so that zero pages do not flatter
it. trimig: ``trimig run --ram RAM --fill random`` with the built-in workload guest at
``--dirty-rate`` (postcopy) or 4 KiB/s, one page a second (idle).

Figures per migration: throughput (``ram.transferred`` / ``total-time``, MB/s = 1e6 B/s) and
``ram.mbps``, ``total-time``, ``downtime`` (as each engine reports it), the pause the guest
sees (the source's STOP event to the destination's RESUME event, by their QMP timestamps),
trimig's ``x-postcopy-latency-p50``/``-p99`` (the destination's fault latencies), and CPU
seconds per GiB transferred of each side: utime+stime (and cutime+cstime) from /proc/PID/stat
of the engine process and of its live descendants, before ``migrate`` and once the side
reports completed. ``all`` counts the guest (QEMU's vCPU thread, trimig's guest process);
``engine`` leaves it out (QEMU: minus the "CPU n/TCG" threads; trimig: the engine process
alone), and each engine's peak memory of its own (RssAnon + RssFile at every poll, and
VmHWM; bench/engine_memory.py). trimig's destination guest is verified afterwards
(``x-guest-verify``), outside the timing.

The raw socket limit (bench/raw_socket.py's measurement): a sender process and a receiver
process moving the same number of bytes (RAM) over the same transport with blocking
sockets, into fresh memory: ``memfd`` (a fresh shared memfd mapping, the kind of memory
trimig's destination fills: the trimig/raw ratio uses it) and ``anon`` (fresh anonymous memory
with MADV_HUGEPAGE, the kind QEMU allocates). Timed by the receiver, first byte to last.

Extra rows (trimig only, idle guest, unix): ``trimig incoming`` + ``trimig migrate`` (two
processes; figures from their ``--json`` output) and ``trimig demo``.

Before every sample the run waits (``--quiesce``, up to 10 s) until the memory freed by
the one before has been handed back to the host: on a VM with free page reporting a GiB
freed a moment ago is cheaper or dearer to touch again than one freed long ago, and the
destination's first touch is most of its CPU (``settled_s`` records the wait). With
``--prewarm 4G`` it then writes and frees 4 GiB of fresh memory, so that every row's fresh
memory is of the just-written kind rather than whatever the host had let go cold
(``prewarm_MBps`` records how cold it was).
``os.getloadavg()`` is recorded before every sample: the machine may be shared. ``--json
FILE`` writes every sample; a failed migration is a failed sample and the run goes on.
``--rows`` picks rows (e.g. ``--rows trimig`` to chase one), ``--workdir DIR`` keeps the
engines' logs. Without ``qemu-system-x86_64`` the QEMU rows are skipped with a
message. ``--trimig "CMD ..."`` runs another trimig (default: this Python's ``trimig.cli``). The
engines run in the work directory, so PYTHONPATH (not the current directory) picks the
tree: ``git archive HEAD trimig | tar -x -C DIR`` and ``PYTHONPATH=DIR`` measure a commit
while the checkout changes; the JSON's ``trimig`` says which tree ran.

Its parts, beside it in bench/: vs_qemu_engines.py (the cases, the QEMU and trimig engine
launchers and what a run shares), vs_qemu_migration.py (one migration through QMP),
vs_qemu_other_rows.py (the raw socket limit, the CLI paths), vs_qemu_report.py (the table),
vs_qemu_cpu.py (CPU seconds from /proc), vs_qemu_guest.py (QEMU's firmware).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from trimig.errors import ConfigError
from trimig.units import parse_size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its modules, when loaded by path
from vs_qemu_engines import CASES, SampleFailed, Setup, parse_case, qemu_version
from vs_qemu_guest import FIRMWARE_CODE as FIRMWARE_CODE  # re-exported: the guest's tests
from vs_qemu_guest import firmware as firmware
from vs_qemu_migration import qmp_migration
from vs_qemu_other_rows import demo, raw_transfer, two_process
from vs_qemu_report import summarise

DEFAULT_CASES = "precopy-unix,precopy-tcp,postcopy-unix"
RAW_MEMORY = ("memfd", "anon")

# --- the run -------------------------------------------------------------------------------------


#: The free page reporting counter of this kind of VM (absent elsewhere): how much freed
#: memory the guest kernel has handed back to the host, which makes its next touch a host fault.
REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


async def memory_settled(limit: float) -> float:
    """Wait until freed memory has been handed back (the reporting counter still for 1 s).

    Returns the seconds waited, at most ``limit``. A sample that follows one freeing GiBs
    would otherwise get fresh memory cheaper or dearer by what its predecessor was: every
    sample starts from the same state instead. Returns 0 at once where the counter is absent.
    """
    if limit <= 0 or not os.path.exists(REPORTED_KIB):
        return 0.0
    began = time.monotonic()

    def reported() -> int:
        with open(REPORTED_KIB) as counter:
            return int(counter.read())

    last, still_since = reported(), began
    while (now := time.monotonic()) - began < limit:
        await asyncio.sleep(0.25)
        current = reported()
        if current != last:
            last, still_since = current, time.monotonic()
        elif now - still_since >= 1.0:
            break
    return round(time.monotonic() - began, 2)


def prewarm(size: int) -> dict[str, float]:
    """Write ``size`` bytes into a new memfd with pwritev and free it again.

    On this kind of VM a guest page that has not been written for a while costs the host a
    fault on its next first write (3-4 CPU s/GiB against 0.4 for a page freed a moment
    ago), and which process gets such pages depends on who allocated first: --prewarm
    makes the next sample's fresh memory the just-written kind for every row. The rate is
    recorded too: it says how cold the memory was."""
    fd = os.memfd_create("vs-qemu-prewarm")
    chunk = bytes(2 << 20)
    began = time.perf_counter()
    try:
        for offset in range(0, size, len(chunk)):
            os.pwritev(fd, [chunk], offset)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - began
    return {"prewarm_s": round(seconds, 2), "prewarm_MBps": round(size / seconds / 1e6)}


async def measure(setup: Setup, row: str, case: str, round_index: int | None) -> dict[str, Any]:
    settled = await memory_settled(setup.args.quiesce)
    warmed = prewarm(setup.args.prewarm) if setup.args.prewarm else {}
    load = os.getloadavg()
    began = time.time()
    try:
        if row in ("qemu", "trimig"):
            sample = await qmp_migration(setup, row, case)
        elif row.startswith("raw-"):
            sample = raw_transfer(setup, parse_case(case)[2], row[len("raw-") :])
        elif row == "trimig-cli":
            sample = two_process(setup)
        elif row == "trimig-demo":
            sample = demo(setup)
        else:
            raise AssertionError(row)
    except SampleFailed as failure:
        sample = {"failed": str(failure)}
    sample = {
        "row": row,
        "case": case,
        "round": round_index,
        "loadavg": load,
        "settled_s": settled,
        **warmed,
        "started": began,
        **sample,
    }
    shown = {
        k: v
        for k, v in sample.items()
        if k
        not in ("events", "source_query", "destination_query", "case", "row", "round", "started")
    }
    label = "warm-up" if round_index is None else f"round {round_index + 1}"
    print(f"{label} {case} {row}: {json.dumps(shown, default=str)}", file=sys.stderr, flush=True)
    return sample


ROWS = ("qemu", "trimig", "raw-memfd", "raw-anon", "trimig-cli", "trimig-demo")


def rows_for(case: str, setup: Setup) -> list[str]:
    rows = ["trimig"]
    if setup.qemu is not None:
        rows.insert(0, "qemu")
    if case.startswith("precopy") and not parse_case(case)[1]:  # (raw: plaintext)
        rows += [f"raw-{memory}" for memory in RAW_MEMORY]
        if case == "precopy-unix" and setup.args.extra:
            rows += ["trimig-cli", "trimig-demo"]
    if setup.args.rows:
        wanted = setup.args.rows.split(",")
        rows = [row for row in rows if row in wanted]
    return rows


async def run(setup: Setup) -> dict[str, Any]:
    cases = [case.strip() for case in setup.args.cases.split(",") if case.strip()]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    if setup.qemu is not None:
        setup.prepare_qemu()
    results: dict[str, Any] = {"warmup": [], "samples": []}
    if setup.args.warmup:
        for row in ("qemu", "trimig", "raw-memfd"):
            if row in rows_for(cases[0], setup):
                results["warmup"].append(await measure(setup, row, cases[0], None))
    for round_index in range(setup.args.rounds):
        for case in cases:
            rows = rows_for(case, setup)
            shift = round_index % len(rows)  # each row leads in turn
            for row in rows[shift:] + rows[:shift]:
                results["samples"].append(await measure(setup, row, case, round_index))
    return results


def trimig_origin(command: Sequence[str], cwd: str) -> str:
    """Where the engines' trimig comes from (run from ``cwd``, as they are), and its commit
    when that is a git checkout (``-dirty``: with uncommitted changes)."""
    python = command[0] if command and "python" in os.path.basename(command[0]) else sys.executable
    output = subprocess.run(
        [python, "-c", "import trimig, os; print(os.path.dirname(trimig.__file__))"],
        capture_output=True,
        text=True,
        cwd=cwd,
    ).stdout.strip()
    try:
        commit = subprocess.run(
            ["git", "-C", output, "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"{output} {commit}".strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"of {', '.join(CASES)}")
    parser.add_argument(
        "--dirty-rate",
        default="256M",
        help="bytes/s the running guests dirty in postcopy (default 256M)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every sample here")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU rows")
    parser.add_argument("--trimig", help="the trimig command (default: this Python's trimig.cli)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random fills")
    parser.add_argument(
        "--no-preempt",
        dest="preempt",
        action="store_false",
        help="postcopy without postcopy-preempt (both engines)",
    )
    parser.add_argument(
        "--no-extra",
        dest="extra",
        action="store_false",
        help="leave out trimig incoming+migrate and trimig demo",
    )
    parser.add_argument("--rows", help=f"only these rows, of {', '.join(ROWS)} (default all)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not verify trimig's destination guests",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds between migrate-incoming and migrate (default 0.2)",
    )
    parser.add_argument(
        "--quiesce",
        type=float,
        default=10.0,
        help="before each sample, wait up to this many seconds for freed memory to be handed"
        " back to the host (free page reporting; default 10, 0: do not wait)",
    )
    parser.add_argument(
        "--prewarm",
        default="0",
        help="before each sample, after --quiesce, write and free this much fresh memory "
        "(e.g. 4G), so every row's fresh memory is of the just-written kind (default 0: off)",
    )
    parser.add_argument(
        "--workdir", help="keep the engines' logs and sockets here (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    try:
        args.prewarm = parse_size(args.prewarm, what="--prewarm")
    except ConfigError as exc:
        parser.error(str(exc))
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    keep = contextlib.nullcontext(args.workdir) if args.workdir else None
    with keep or tempfile.TemporaryDirectory(prefix="trimig-vs-qemu-") as workdir:
        setup = Setup(args, workdir)
        results = asyncio.run(run(setup))
        text, summary = summarise(results)
        results.update(
            summary=summary,
            command=" ".join(sys.argv),
            arguments=vars(args),
            qemu=qemu_version(setup.qemu),
            qemu_dirty_rate=setup.qemu_rates.get(setup.dirty_rate),
            trimig=trimig_origin(setup.trimig, workdir),
            kernel=os.uname().release,
            cpus=os.cpu_count(),
        )
    print(text)
    if setup.qemu is None:
        why = "--no-qemu" if args.no_qemu else f"{args.qemu} not found"
        print(f"\nQEMU rows skipped: {why}.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1, default=str)


if __name__ == "__main__":
    main()
