"""The engines of bench/vs_qemu.py: QEMU and ``trimig run`` processes, launched alike and
driven by one QMPClient each; what a run shares (Setup); the cases."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from vs_qemu_cpu import process_cpu
from vs_qemu_guest import PAGE, firmware

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
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
DEFAULT_TRIMIG = [sys.executable, "-c", "import sys; from trimig.cli import main; sys.exit(main())"]


class SampleFailed(Exception):
    """A migration of the run failed: recorded as a failed sample, the run goes on."""


def parse_case(case: str) -> tuple[bool, bool, str]:
    """``postcopy-tls-tcp`` -> (postcopy, tls, transport)."""
    parts = case.split("-")
    return parts[0] == "postcopy", "tls" in parts[1:-1], parts[-1]


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
            import raw_socket  # bench/

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
