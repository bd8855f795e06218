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

``os.getloadavg()`` is recorded before every sample: the machine may be shared. ``--json
FILE`` writes every sample; a failed migration is a failed sample and the run goes on.
``--rows`` picks rows (e.g. ``--rows trimig`` to chase one), ``--workdir DIR`` keeps the
engines' logs. Without ``qemu-system-x86_64`` the QEMU rows are skipped with a
message. ``--trimig "CMD ..."`` runs another trimig (default: this Python's ``trimig.cli``). The
engines run in the work directory, so PYTHONPATH (not the current directory) picks the
tree: ``git archive HEAD trimig | tar -x -C DIR`` and ``PYTHONPATH=DIR`` measure a commit
while the checkout changes; the JSON's ``trimig`` says which tree ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
MAX_BANDWIDTH = 100 * GIB  # migrate-set-parameters max-bandwidth, bytes/s
POLL = 0.01  # query-migrate interval, s
TIMEOUT = 180.0  # a migration that takes longer has hung
IDLE_TRIMIG_RATE = "4K"  # one page a second: trimig's workload guest has no idle mode
QEMU_FILL_SLACK = 64 << 20  # RAM not covered by the random fill (BIOS areas, top of RAM)
QEMU_FILL_ADDRESS = 0x100000
CASES = (
    "precopy-unix",
    "precopy-tcp",
    "postcopy-unix",
    "postcopy-tcp",
    "precopy-tls-tcp",
    "postcopy-tls-tcp",
)
DEFAULT_CASES = "precopy-unix,precopy-tcp,postcopy-unix"
RAW_MEMORY = ("memfd", "anon")
TLS_CREDS_ID = "tls0"
TLS_HOSTNAME = "localhost"  # in the test certificates (tests/tls_certs.py), as 127.0.0.1
DEFAULT_TRIMIG = [sys.executable, "-c", "import sys; from trimig.cli import main; sys.exit(main())"]

# --- the QEMU guest: bench/qemu_guest.S, assembled ------------------------------------------------

#: ``as --32 bench/qemu_guest.S`` then ``objcopy -O binary -j .text`` (see that file).
FIRMWARE_CODE = bytes.fromhex(
    "fafce4920c0224fee6922e660f0116e0000f20c06683c8010f22c066ea23000f00080066b810008ed88ec08ed08ee0"
    "8ee8bc000008000f011df0010f00c705f000e0feff010000c7055003e0fe00070000c7056003e0fe00040000b011e6"
    "20e6a0b020e621b028e6a1b004e621b002e6a1b001e621e6a1b0fee621b0ffe6a1b034e643a10c020f00e64088e0e6"
    "408b3500020f00fbf4fa8b0d08020f0085c974f3fe0681c6001000003b3504020f0072068b3500020f004975e7ebd8"
    "50b020e62058cf8d742600900000000000000000ffff0000009bcf00ffff00000093cf001700c8000f006690"
    + "00" * 256  # the IDT's first 32 gates
    + "bc000800008e0f000701e8000f008db426000000008d7600000010000000103c00000000a9040000"
)
FIRMWARE_PARAMS = 0x200  # "params" in qemu_guest.S: first, last, per_tick, divisor (u32 each)
FIRMWARE_SIZE = 0x10000
RESET_VECTOR = 0xFFF0
PIT_HZ = 1193182
PAGE = 4096


def firmware(first: int, last: int, dirty_rate: int) -> tuple[bytes, float]:
    """The 64 KiB -bios image sweeping [first, last) at ``dirty_rate`` bytes/s (0: idle),
    and the rate it actually runs at (the PIT divisor and the pages per tick are integers)."""
    if dirty_rate:
        per_tick = max(1, round(dirty_rate / PAGE / 1000))
        divisor = max(1, min(0xFFFF, round(PIT_HZ * per_tick * PAGE / dirty_rate)))
    else:
        per_tick, divisor = 0, 1193
    image = bytearray(FIRMWARE_SIZE)
    image[: len(FIRMWARE_CODE)] = FIRMWARE_CODE
    struct.pack_into("<IIII", image, FIRMWARE_PARAMS, first, last, per_tick, divisor)
    image[RESET_VECTOR : RESET_VECTOR + 5] = b"\xea" + struct.pack("<HH", 0, 0xF000)
    return bytes(image), per_tick * PAGE * PIT_HZ / divisor


class SampleFailed(Exception):
    """A migration of the run failed: recorded as a failed sample, the run goes on."""


# --- CPU time from /proc ----------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as stat:
            text = stat.read()
    except OSError:  # gone meanwhile
        return None
    return text[text.rindex(")") + 2 :].split()


def _seconds(fields: list[str], children: bool = True) -> float:
    # after "(comm) ": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICK


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(f"/proc/{name}/stat")
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_cpu(pid: int, kind: str) -> dict[str, float]:
    """CPU seconds so far: ``all`` (the process, its live descendants, reaped children) and
    ``engine`` (without the guest: QEMU's vCPU threads, trimig's guest process)."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return {"all": float("nan"), "engine": float("nan")}
    own = _seconds(fields)
    total = own
    for child in descendants(pid):
        child_fields = _stat_fields(f"/proc/{child}/stat")
        if child_fields is not None:
            total += _seconds(child_fields)
    engine = own
    if kind == "qemu":
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                    name = comm.read().strip()
            except OSError:
                continue
            task = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            if name.startswith("CPU ") and task is not None:
                engine -= _seconds(task, children=False)
    return {"all": total, "engine": engine}


# --- engines ----------------------------------------------------------------------------------


class Engine:
    """One engine process (QEMU or ``trimig run``) and its QMP client."""

    def __init__(self, kind: str, role: str, process: subprocess.Popen[bytes], qmp: Any) -> None:
        self.kind, self.role, self.process, self.qmp = kind, role, process, qmp
        from qemu.qmp import EventListener

        self.events = EventListener(("STOP", "RESUME", "MIGRATION"))
        qmp.register_listener(self.events)

    def cpu(self) -> dict[str, float]:
        return process_cpu(self.process.pid, self.kind)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), 5)
        for _ in range(200):
            if self.process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def connect_qmp(path: str, process: subprocess.Popen[bytes], what: str) -> Any:
    """A QMPClient connected to ``path``, retried while the engine starts (its guest, the fill)."""
    from qemu.qmp import QMPClient

    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SampleFailed(f"{what} exited with {process.returncode} before serving QMP")
        client = QMPClient(what)
        try:
            await client.connect(path)
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Setup:
    """What a run shares: arguments, the work directory, the QEMU files, the raw sender."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        from trimig.units import parse_rate, parse_size

        self.args = args
        self.workdir = workdir
        self.ram = parse_size(args.ram, what="--ram")
        self.dirty_rate = parse_rate(args.dirty_rate, what="--dirty-rate")
        self.trimig = shlex.split(args.trimig) if args.trimig else DEFAULT_TRIMIG
        self.qemu = find_qemu(args.qemu) if not args.no_qemu else None
        self.counter = 0
        self.fill_file = ""
        self.fill_size = 0
        self.firmwares: dict[int, str] = {}
        self._tls_dir = ""
        self.qemu_rates: dict[int, float] = {}
        self._sender: Any = None

    def path(self, name: str) -> str:
        self.counter += 1
        return os.path.join(self.workdir, f"{self.counter:03d}-{name}")

    def prepare_qemu(self) -> None:
        """The random fill file and the two firmwares (idle, running)."""
        import numpy as np

        self.fill_size = max(self.ram - QEMU_FILL_SLACK, self.ram // 2) // PAGE * PAGE
        self.fill_file = os.path.join(self.workdir, "fill.bin")
        rng = np.random.default_rng(self.args.seed)
        with open(self.fill_file, "wb") as out:
            left = self.fill_size
            while left:
                chunk = min(left, 64 << 20)
                out.write(rng.bytes(chunk))
                left -= chunk
        first, last = QEMU_FILL_ADDRESS, QEMU_FILL_ADDRESS + self.fill_size
        for rate in (0, self.dirty_rate):
            image, actual = firmware(first, last, rate)
            path = os.path.join(self.workdir, f"firmware-{rate}.bin")
            with open(path, "wb") as out:
                out.write(image)
            self.firmwares[rate], self.qemu_rates[rate] = path, actual

    def tls_dir(self) -> str:
        """The credentials directory both engines' tls-creds-x509 objects read (made once)."""
        if not self._tls_dir:
            import trustme

            sys.path.insert(0, os.path.join(HERE, "..", "tests"))
            from tls_certs import write_creds

            self._tls_dir = write_creds(os.path.join(self.workdir, "tls"), trustme.CA())
        return self._tls_dir

    def sender_region(self) -> memoryview:
        if self._sender is None:
            import numpy as np

            sys.path.insert(0, HERE)
            import raw_socket

            memory = raw_socket.faulted_region(self.ram)
            np.frombuffer(memory, dtype=np.uint64)[:] = raw_socket.distinct_words(self.ram)
            self._sender = memory
        return memoryview(self._sender)

    async def start(self, kind: str, role: str, running: bool) -> Engine:
        qmp_path = self.path(f"{kind}-{role}.qmp")
        log = open(self.path(f"{kind}-{role}.log"), "wb")  # noqa: SIM115 - the child keeps it
        if kind == "qemu":
            assert self.qemu is not None
            rate = self.dirty_rate if running else 0
            command = [
                self.qemu,
                "-M",
                "pc",
                "-accel",
                "tcg",
                "-m",
                str(self.ram >> 20),
                "-nodefaults",
                "-display",
                "none",
                "-bios",
                self.firmwares[rate],
                "-name",
                f"{role},debug-threads=on",
                "-qmp",
                f"unix:{qmp_path},server=on,wait=off",
            ]
            if role == "source":
                command += ["-device", f"loader,file={self.fill_file},addr={QEMU_FILL_ADDRESS}"]
            else:
                command += ["-incoming", "defer"]
        else:
            rate_text = self.args.dirty_rate if running else IDLE_TRIMIG_RATE
            command = [
                *self.trimig,
                "run",
                "--qmp",
                f"unix:{qmp_path}",
                "--ram",
                self.args.ram,
                "--fill",
                "random",
                "--seed",
                str(self.args.seed),
                "--dirty-rate",
                rate_text,
            ]
            if role == "destination":
                command += ["--incoming", "defer"]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        try:
            client = await connect_qmp(qmp_path, process, f"{kind} {role}")
        except BaseException:
            process.kill()
            process.wait()
            raise
        return Engine(kind, role, process, client)


def find_qemu(name: str) -> str | None:
    """The QEMU binary, or None (with a message saying the QEMU rows are skipped)."""
    found = shutil.which(name)
    if found is None:
        print(
            f"vs_qemu: {name} not found: the QEMU rows are skipped "
            "(Debian: apt-get install qemu-system-x86)",
            file=sys.stderr,
            flush=True,
        )
    return found


def qemu_version(qemu: str | None) -> str | None:
    if qemu is None:
        return None
    output = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return output.splitlines()[0] if output else None


# --- one migration through QMP ------------------------------------------------------------------


def timestamp(event: Any) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def set_up_tls(setup: Setup, source: Engine, destination: Engine) -> None:
    """The same tls-creds-x509 objects and parameters on either engine."""
    for engine, endpoint in ((source, "client"), (destination, "server")):
        await engine.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": TLS_CREDS_ID,
                "dir": setup.tls_dir(),
                "endpoint": endpoint,
                "verify-peer": True,
            },
        )
        parameters = {"tls-creds": TLS_CREDS_ID}
        if engine is source:
            parameters["tls-hostname"] = TLS_HOSTNAME
        await engine.execute("migrate-set-parameters", parameters)


async def wait_status(engine: Engine, what: str, memory: Any = None) -> dict[str, Any]:
    """query-migrate every POLL s until the migration ends; ``memory.sample()`` each time."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        info: dict[str, Any] = await engine.execute("query-migrate")
        if memory is not None:
            memory.sample()
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise SampleFailed(f"{what}: no end after {TIMEOUT:.0f} s: {info}")
        await asyncio.sleep(POLL)


def parse_case(case: str) -> tuple[bool, bool, str]:
    """``postcopy-tls-tcp`` -> (postcopy, tls, transport)."""
    parts = case.split("-")
    return parts[0] == "postcopy", "tls" in parts[1:-1], parts[-1]


async def qmp_migration(setup: Setup, kind: str, case: str) -> dict[str, Any]:
    postcopy, _, transport = parse_case(case)
    source = await setup.start(kind, "source", running=postcopy)
    try:
        destination = await setup.start(kind, "destination", running=postcopy)
    except BaseException:
        await source.close()
        raise
    try:
        return await _migrate(setup, kind, case, source, destination, transport, postcopy)
    finally:
        await destination.close()
        await source.close()


async def _migrate(
    setup: Setup,
    kind: str,
    case: str,
    source: Engine,
    destination: Engine,
    transport: str,
    postcopy: bool,
) -> dict[str, Any]:
    capabilities = [{"capability": "events", "state": True}]
    if postcopy:
        capabilities.append({"capability": "postcopy-ram", "state": True})
        if setup.args.preempt:
            capabilities.append({"capability": "postcopy-preempt", "state": True})
    for engine in (source, destination):
        await engine.execute("migrate-set-capabilities", {"capabilities": capabilities})
        await engine.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    if parse_case(case)[1]:
        await set_up_tls(setup, source, destination)
    if transport == "unix":
        uri = f"unix:{setup.path('migration.sock')}"
        await destination.execute("migrate-incoming", {"uri": uri})
    else:
        await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        address = (await destination.execute("query-migrate"))["socket-address"][0]
        uri = f"tcp:{address['host']}:{address['port']}"
    await asyncio.sleep(setup.args.settle)
    for engine in (source, destination):
        engine.events.clear()
    cpu_before = {"source": source.cpu(), "destination": destination.cpu()}
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from engine_memory import PeakMemory

    memory = PeakMemory({"source": source.process.pid, "destination": destination.process.pid})
    started = time.monotonic()
    await source.execute("migrate", {"uri": uri})
    if postcopy:
        await source.execute("migrate-start-postcopy")
    info = await wait_status(source, f"{kind} {case} source", memory)
    cpu_after = {"source": source.cpu()}
    source_wall = time.monotonic() - started
    if info["status"] != "completed":
        with contextlib.suppress(Exception):
            incoming = await destination.execute("query-migrate")
            info["destination-error-desc"] = incoming.get("error-desc")
        raise SampleFailed(
            f"{kind} {case}: the migration ended {info['status']}: {info.get('error-desc')}; "
            f"the destination: {info.get('destination-error-desc')}"
        )
    for _ in range(100):
        # QEMU 7.2 says completed a moment before it sets total-time and downtime (0 until
        # then: migration_calculate_complete runs after the state change)
        if info.get("total-time"):
            break
        await asyncio.sleep(POLL)
        info = await source.execute("query-migrate")
    incoming = await wait_status(destination, f"{kind} {case} destination", memory)
    cpu_after["destination"] = destination.cpu()
    destination_wall = time.monotonic() - started
    # the RESUME may follow the destination's completed by a moment
    stop = resume = None
    deadline = time.monotonic() + 5
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen += [("source", event) for event in source.events.clear()]
        seen += [("destination", event) for event in destination.events.clear()]
        stops = [e for side, e in seen if side == "source" and e["event"] == "STOP"]
        resumes = [e for side, e in seen if side == "destination" and e["event"] == "RESUME"]
        if stops and resumes:
            stop, resume = timestamp(stops[0]), timestamp(resumes[0])
            break
        await asyncio.sleep(POLL)
    verified = None
    if kind == "trimig" and setup.args.verify:
        verified = (await destination.execute("x-guest-verify"))["verified"]
        if not verified:
            raise SampleFailed(f"trimig {case}: the destination guest did not verify its memory")
    ram = info.get("ram", {})
    transferred = int(ram.get("transferred", 0))
    total_ms = float(info.get("total-time", 0))
    gib = transferred / GIB if transferred else float("nan")
    cpu = {
        f"{side}_{part}_s": round(cpu_after[side][part] - cpu_before[side][part], 3)
        for side in ("source", "destination")
        for part in ("all", "engine")
    }
    sample: dict[str, Any] = {
        "status": info["status"],
        "total_ms": total_ms,
        "setup_ms": info.get("setup-time"),
        "downtime_ms": info.get("downtime"),
        "transferred": transferred,
        "throughput_MBps": transferred / total_ms / 1000 if total_ms else float("nan"),
        "mbps": ram.get("mbps"),
        "pause_ms": (resume - stop) * 1000 if stop is not None and resume is not None else None,
        "source_wall_s": round(source_wall, 3),
        "destination_wall_s": round(destination_wall, 3),
        **cpu,
        **memory.figures(),
        **{key.replace("_s", "_s_per_gib"): value / gib for key, value in cpu.items()},
        "events": [
            (side, event["event"], timestamp(event), event.get("data", {}).get("status"))
            for side, event in seen
        ],
        "verified": verified,
        "source_query": info,
        "destination_query": incoming,
    }
    for name in ("x-postcopy-latency-p50", "x-postcopy-latency-p99", "postcopy-latency"):
        if name in incoming:
            sample[name.replace("x-", "").replace("-", "_") + "_us"] = incoming[name] / 1000
    if "postcopy-blocktime" in incoming:
        sample["blocktime_ms"] = incoming["postcopy-blocktime"]
    return sample


# --- the raw socket limit ------------------------------------------------------------------------


def raw_transfer(setup: Setup, transport: str, memory: str) -> dict[str, Any]:
    region = setup.sender_region()
    import raw_socket  # bench/, on sys.path since sender_region

    sender_before = time.thread_time()
    result = raw_socket.run_receiver("blocking", transport, region, 1 << 20, memory)
    sender_cpu = time.thread_time() - sender_before
    seconds = result["seconds"]
    gib = len(region) / GIB
    return {
        "memory": memory,
        "total_ms": seconds * 1000,
        "transferred": len(region),
        "throughput_MBps": len(region) / seconds / 1e6,
        "source_all_s": round(sender_cpu, 3),
        "destination_all_s": round(result["cpu_s"], 3),
        "source_all_s_per_gib": sender_cpu / gib,
        "destination_all_s_per_gib": result["cpu_s"] / gib,
    }


# --- the CLI paths: trimig incoming + trimig migrate, trimig demo ---------------------------------


def run_cli(command: Sequence[str], what: str, cwd: str) -> dict[str, Any]:
    """Run a trimig command with --json; its last JSON line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    output, _ = process.communicate(timeout=TIMEOUT)
    return _last_json(output, what, process.returncode)


def children_cpu() -> float:
    """CPU of this process's reaped children (and theirs) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_json(output: bytes, what: str, returncode: int | None) -> dict[str, Any]:
    for line in reversed(output.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            if returncode != 0:
                raise SampleFailed(
                    f"{what} exited with {returncode}: {result.get('error', result)}"
                )
            return result
    raise SampleFailed(f"{what} exited with {returncode} and printed no JSON")


def cli_sample(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    transferred = int(ram.get("transferred", 0))
    total_ms = float(info.get("total-time", 0))
    return {
        "status": info.get("status"),
        "verified": info.get("verified"),
        "total_ms": total_ms,
        "downtime_ms": info.get("downtime"),
        "transferred": transferred,
        "throughput_MBps": transferred / total_ms / 1000 if total_ms else float("nan"),
        "mbps": ram.get("mbps"),
    }


def two_process(setup: Setup) -> dict[str, Any]:
    """``trimig incoming unix:PATH`` and ``trimig migrate unix:PATH``, idle guests."""
    path = setup.path("cli.sock")
    guest = [
        "--ram",
        setup.args.ram,
        "--fill",
        "random",
        "--seed",
        str(setup.args.seed),
        "--dirty-rate",
        IDLE_TRIMIG_RATE,
        "--json",
    ]
    cpu_before = children_cpu()
    incoming = subprocess.Popen(
        [*setup.trimig, "incoming", f"unix:{path}", *guest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=setup.workdir,
    )
    try:
        assert incoming.stderr is not None
        line = incoming.stderr.readline().decode(errors="replace")
        while line and "listening on" not in line:
            line = incoming.stderr.readline().decode(errors="replace")
        if not line:
            raise SampleFailed(f"trimig incoming exited with {incoming.wait()} before listening")
        sent = run_cli(
            [*setup.trimig, "migrate", f"unix:{path}", *guest], "trimig migrate", setup.workdir
        )
        output, _ = incoming.communicate(timeout=TIMEOUT)
        received = _last_json(output, "trimig incoming", incoming.returncode)
    finally:
        if incoming.poll() is None:
            incoming.kill()
        incoming.wait()
    sample = cli_sample(sent)
    sample["verified"] = received.get("verified")
    # both commands, start-up (guest start, fill) to exit (verification included)
    sample["commands_cpu_s"] = round(children_cpu() - cpu_before, 3)
    return sample


def demo(setup: Setup) -> dict[str, Any]:
    cpu_before = children_cpu()
    info = run_cli(
        [
            *setup.trimig,
            "demo",
            "--transport",
            "unix",
            "--ram",
            setup.args.ram,
            "--fill",
            "random",
            "--seed",
            str(setup.args.seed),
            "--dirty-rate",
            IDLE_TRIMIG_RATE,
            "--json",
        ],
        "trimig demo",
        setup.workdir,
    )
    sample = cli_sample(info)
    sample["commands_cpu_s"] = round(children_cpu() - cpu_before, 3)
    return sample


# --- the run -------------------------------------------------------------------------------------


async def measure(setup: Setup, row: str, case: str, round_index: int | None) -> dict[str, Any]:
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


# --- the table ----------------------------------------------------------------------------------


def median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
    values = [v for v in values if v == v]  # not NaN
    return statistics.median(values) if values else None


def spread(samples: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 0) -> str:
    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
    values = [v * scale for v in values if v == v]
    if not values:
        return "-"
    mid = statistics.median(values)
    text = f"{mid:.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}" if top and bottom else "-"


ROW_NAMES = {
    "qemu": "QEMU",
    "trimig": "trimig (QMP)",
    "raw-memfd": "raw, fresh memfd",
    "raw-anon": "raw, fresh anon THP",
    "trimig-cli": "trimig incoming+migrate",
    "trimig-demo": "trimig demo",
}


SUMMARY_KEYS = (
    "throughput_MBps",
    "mbps",
    "total_ms",
    "downtime_ms",
    "pause_ms",
    "postcopy_latency_p50_us",
    "postcopy_latency_p99_us",
    "blocktime_ms",
    "source_all_s_per_gib",
    "destination_all_s_per_gib",
    "source_engine_s_per_gib",
    "destination_engine_s_per_gib",
    "source_own_peak_MiB",
    "destination_own_peak_MiB",
)
HEADER = (
    f"{'':24} {'MB/s':>17} {'Mbit/s':>7} {'total ms':>17} {'downtime':>9} {'pause ms':>15} "
    f"{'p50/p99 us':>10} {'CPU s/GiB':>9} {'engine':>9} {'own MiB':>9} {'/QEMU':>6} {'/QMP':>5} "
    f"{'/raw':>5}"
)
LEGEND = """\
MB/s: ram.transferred / total-time (median, range); Mbit/s: ram.mbps; downtime: as each
engine reports it; pause: source STOP event to destination RESUME event; p50/p99: trimig's
x-postcopy-latency-p50/p99; CPU s/GiB (src/dst, per GiB transferred): with the guest
(QEMU's vCPU thread, trimig's guest process) and without it (engine). own MiB (src/dst):
peak RssAnon+RssFile of the engine process (QEMU's includes its guest RAM; trimig's
budget is 3% of RAM + 64 MiB, bench/engine_memory.py). /QEMU and /raw:
throughput ratios (postcopy: total-time of QEMU / trimig, so above 1 is trimig faster);
/QMP: to trimig's QMP row; /raw: to raw into fresh memfd memory (trimig's kind)."""


def cpu_pair(group: list[dict[str, Any]], part: str) -> str:
    return side_pair(group, f"{{side}}_{part}_s_per_gib", 2)


def side_pair(group: list[dict[str, Any]], key: str, digits: int) -> str:
    """Source/destination medians of ``key`` (``{side}`` in it), "-" where none."""
    values = [median(group, key.format(side=side)) for side in ("source", "destination")]
    if all(value is None for value in values):
        return "-"
    return "/".join(f"{value:.{digits}f}" if value is not None else "-" for value in values)


def versus(
    row: str, other: str, mine: float | None, reference: dict[str, float | None], postcopy: bool
) -> str:
    """The ratio of ``row`` to ``other`` (above 1: ``row`` is better), or "" where none."""
    if row == other or row.startswith("raw") or (other == "trimig" and row == "qemu"):
        return ""
    if postcopy:  # times: lower is better
        return ratio(reference[other], mine)
    return ratio(mine, reference[other])


def summarise(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    samples = results["samples"]
    cases = list(dict.fromkeys(s["case"] for s in samples))
    lines: list[str] = [LEGEND]
    summary: dict[str, Any] = {}
    for case in cases:
        lines += ["", case, HEADER]
        by_row: dict[str, list[dict[str, Any]]] = {}
        failed: dict[str, int] = {}
        for sample in samples:
            if sample["case"] == case:
                if sample.get("failed"):
                    failed[sample["row"]] = failed.get(sample["row"], 0) + 1
                    by_row.setdefault(sample["row"], [])
                else:
                    by_row.setdefault(sample["row"], []).append(sample)
        postcopy = case.startswith("postcopy")
        reference = {
            row: median(by_row.get(row, []), "total_ms" if postcopy else "throughput_MBps")
            for row in ("qemu", "trimig", "raw-memfd")
        }
        summary[case] = {}
        for row, group in by_row.items():
            mine = median(group, "total_ms" if postcopy else "throughput_MBps")

            p50 = median(group, "postcopy_latency_p50_us")
            p99 = median(group, "postcopy_latency_p99_us")
            latency = f"{p50:.0f}/{p99:.0f}" if p50 is not None and p99 is not None else "-"
            mbps = median(group, "mbps")
            lines.append(
                f"{ROW_NAMES.get(row, row):24} {spread(group, 'throughput_MBps'):>17} "
                f"{(f'{mbps:.0f}' if mbps else '-'):>7} {spread(group, 'total_ms'):>17} "
                f"{spread(group, 'downtime_ms'):>9} {spread(group, 'pause_ms', digits=1):>15} "
                f"{latency:>10} {cpu_pair(group, 'all'):>9} {cpu_pair(group, 'engine'):>9} "
                f"{side_pair(group, '{side}_own_peak_MiB', 0):>9} "
                f"{versus(row, 'qemu', mine, reference, postcopy):>6} "
                f"{versus(row, 'trimig', mine, reference, postcopy):>5} "
                f"{versus(row, 'raw-memfd', mine, reference, postcopy):>5}"
            )
            summary[case][row] = {key: median(group, key) for key in SUMMARY_KEYS}
            summary[case][row]["n"] = len(group)
            summary[case][row]["failed"] = failed.get(row, 0)
        for row, count in failed.items():
            lines.append(f"  {ROW_NAMES.get(row, row)}: {count} failed (see the JSON)")
    lines += tls_lines(summary)
    loads = [s["loadavg"][0] for s in results["warmup"] + samples]
    if loads:
        lines += [
            "",
            f"load average (1 min) before the samples: {min(loads):.2f}-{max(loads):.2f} "
            f"(median {statistics.median(loads):.2f}) on {os.cpu_count()} CPUs",
        ]
    return "\n".join(lines), summary


def tls_lines(summary: dict[str, Any]) -> list[str]:
    """Each engine's TLS case against its plaintext one of the same run (throughput ratios,
    postcopy: total-time, plaintext / TLS; below 1 is the cost of TLS), and trimig's TLS
    against QEMU's."""
    lines = []
    for case, rows in summary.items():
        plain_case = case.replace("-tls-", "-")
        if not parse_case(case)[1] or plain_case not in summary:
            continue
        postcopy = parse_case(case)[0]
        key = "total_ms" if postcopy else "throughput_MBps"
        tls = {row: rows.get(row, {}).get(key) for row in ("qemu", "trimig")}
        plain = {row: summary[plain_case].get(row, {}).get(key) for row in ("qemu", "trimig")}
        pairs = [
            ("QEMU TLS / QEMU plain", tls["qemu"], plain["qemu"]),
            ("trimig TLS / trimig plain", tls["trimig"], plain["trimig"]),
            ("trimig TLS / QEMU TLS", tls["trimig"], tls["qemu"]),
        ]
        figures = ", ".join(
            f"{name} {ratio(bottom, top) if postcopy else ratio(top, bottom)}"
            for name, top, bottom in pairs
        )
        lines += ["", f"{case} against {plain_case} ({key}; above 1: faster):", f"  {figures}"]
    return lines


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
        "--workdir", help="keep the engines' logs and sockets here (default: a temporary one)"
    )
    args = parser.parse_args(argv)
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
