"""Running the adversarial guest (tests/guests/adversarial.py) through the paths users run:
``trimig incoming`` + ``trimig migrate`` as two processes, and two ``trimig run`` engines
driven over QMP by QEMU's own ``qemu.qmp`` client. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from qemu.qmp import QMPClient

HERE = os.path.dirname(os.path.abspath(__file__))
ADVERSARIAL = os.path.join(HERE, "guests", "adversarial.py")
TRIMIG = [sys.executable, "-m", "trimig.cli"]
#: Bounds one whole migration (start, migrate, run on, verify) on a loaded 2-core machine.
DEADLINE = 90.0
MODES = ("precopy", "postcopy", "postcopy-preempt")


def guest_command(seed: int, rate: float, words: int = 16) -> list[str]:
    return [
        sys.executable,
        ADVERSARIAL,
        "--seed",
        str(seed),
        "--rate",
        str(rate),
        "--words",
        str(words),
    ]


@attrs.frozen
class Cell:
    """One migration to try: transport, mode, layout and the guest's behaviour."""

    transport: str
    mode: str = "precopy"
    ram: str = "64M"
    huge: str = "0"
    seed: int = 1
    rate: float = 2000.0
    words: int = 16

    @property
    def postcopy(self) -> bool:
        return self.mode != "precopy"

    def guest(self) -> list[str]:
        return guest_command(self.seed, self.rate, self.words)

    def layout_options(self) -> list[str]:
        return ["--ram", self.ram, "--huge", self.huge]


@contextlib.contextmanager
def uris(transport: str) -> Iterator[tuple[str, str]]:
    """(listen URI, connect URI) across processes; tcp's connect URI has ``{port}``."""
    with tempfile.TemporaryDirectory(prefix="tmadv") as tmp:
        if transport == "tcp":
            yield "tcp:127.0.0.1:0", "tcp:127.0.0.1:{port}"
        elif transport == "unix":
            path = os.path.join(tmp, "m.sock")
            yield f"unix:{path}", f"unix:{path}"
        elif transport == "exec":
            fifo = os.path.join(tmp, "stream.fifo")
            os.mkfifo(fifo)
            yield f"exec:cat {fifo}", f"exec:cat > {fifo}"
        elif transport == "rdma":
            path = os.path.join(tmp, "rdma.sock")
            yield f"rdma:{path}", f"rdma:{path}"
        else:
            raise ValueError(transport)


def _kill(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


def _read_listening(process: subprocess.Popen[str], deadline: float) -> str:
    """The address of ``trimig: listening on ADDRESS`` on the process's stderr."""
    assert process.stderr is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            line = process.stderr.readline()
            if not line:
                break
            if line.startswith("trimig: listening on "):
                return line.split("listening on ", 1)[1].strip()
    raise AssertionError(f"trimig incoming did not say where it listens (exit {process.poll()})")


@attrs.define
class CliResult:
    source: dict[str, Any]
    destination: dict[str, Any]
    source_exit: int
    destination_exit: int
    source_stderr: str
    destination_stderr: str

    def describe(self) -> str:
        return (
            f"source exit {self.source_exit} {self.source.get('status')} "
            f"{self.source.get('error-desc', '')}; destination exit {self.destination_exit} "
            f"{self.destination.get('status')} {self.destination.get('error-desc', '')} "
            f"verdict {self.destination.get('verdict')}\nsource stderr: "
            f"{self.source_stderr[-2000:]}\ndestination stderr: {self.destination_stderr[-2000:]}"
        )


def migrate_with_cli(cell: Cell, *, timeout: float = DEADLINE) -> CliResult:
    """``trimig incoming`` and ``trimig migrate`` as two processes, both with the guest."""
    options = cell.layout_options()
    if cell.postcopy:
        options.append("--postcopy")
        if cell.mode == "postcopy":
            options.append("--no-preempt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + timeout
    with uris(cell.transport) as (listen, connect):
        destination = subprocess.Popen(
            [*TRIMIG, "incoming", listen, "--json", *options, "--", *cell.guest()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            address = _read_listening(destination, deadline)
            if cell.transport == "tcp":
                connect = connect.format(port=address.rsplit(":", 1)[1])
            source = subprocess.run(
                [
                    *TRIMIG,
                    "migrate",
                    connect,
                    "--json",
                    "--warmup",
                    "0.3",
                    *options,
                    "--",
                    *cell.guest(),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            out, err = destination.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            _kill(destination)
    return CliResult(
        _json(source.stdout),
        _json(out),
        source.returncode,
        destination.returncode,
        source.stderr,
        err,
    )


def _json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {"status": "no JSON", "output": text[-2000:]}


# -- QMP ---------------------------------------------------------------------------------


@attrs.define
class QmpResult:
    source: dict[str, Any]
    destination: dict[str, Any]
    verify: dict[str, Any]
    source_status: dict[str, Any]
    stderr: str

    def describe(self) -> str:
        return (
            f"source {self.source.get('status')} {self.source.get('error-desc', '')}; "
            f"destination {self.destination.get('status')} "
            f"{self.destination.get('error-desc', '')}; verify {self.verify}; engines' "
            f"stderr:\n{self.stderr[-3000:]}"
        )


class _Engine:
    def __init__(self, directory: str, name: str, args: Sequence[str], guest: Sequence[str]):
        self.path = os.path.join(directory, f"{name}.sock")
        self.log = os.path.join(directory, f"{name}.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*TRIMIG, "run", "--qmp", f"unix:{self.path}", *args, "--", *guest],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stderr(self) -> str:
        with open(self.log, errors="replace") as file:
            return file.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                for task in os.listdir(f"/proc/{self.process.pid}/task"):
                    with open(f"/proc/{self.process.pid}/task/{task}/children") as file:
                        for child in file.read().split():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(child), 9)
        _kill(self.process)


async def _connect(engine: _Engine, deadline: float) -> QMPClient:
    """Connect once the engine listens (its socket file exists between bind and listen)."""
    while True:
        if engine.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"engine did not start: {engine.stderr()[-2000:]}")
        if os.path.exists(engine.path):
            client = QMPClient()
            try:
                await client.connect(engine.path)
                return client
            except Exception:  # refused: bound, not yet listening
                pass
        await asyncio.sleep(0.05)


async def _until_done(client: QMPClient, deadline: float) -> dict[str, Any]:
    while True:
        info = await client.execute("query-migrate")
        status = info.get("status")
        if status in ("completed", "failed", "cancelled", "postcopy-paused"):
            return info
        if time.monotonic() > deadline:
            return {**info, "error-desc": f"still {status} at the deadline"}
        await asyncio.sleep(0.01)


async def _qmp_migration(cell: Cell, directory: str, switch_after: float) -> QmpResult:
    deadline = time.monotonic() + DEADLINE
    layout = cell.layout_options()
    dst = _Engine(directory, "dst", [*layout, "--incoming", "defer"], cell.guest())
    src = _Engine(directory, "src", layout, cell.guest())
    try:
        d, s = await _connect(dst, deadline), await _connect(src, deadline)
        try:
            caps = [
                {"capability": "postcopy-ram", "state": cell.postcopy},
                {"capability": "postcopy-preempt", "state": cell.mode == "postcopy-preempt"},
            ]
            for client in (d, s):
                await client.execute("migrate-set-capabilities", {"capabilities": caps})
            await s.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30})
            with uris(cell.transport) as (listen, connect):
                await d.execute("migrate-incoming", {"uri": listen})
                if cell.transport == "tcp":
                    info = await d.execute("query-migrate")
                    connect = connect.format(port=info["socket-address"][0]["port"])
                await asyncio.sleep(0.3)  # the source guest runs (and writes) a while first
                await s.execute("migrate", {"uri": connect})
                if cell.postcopy:
                    await asyncio.sleep(switch_after)
                    with contextlib.suppress(Exception):  # it may have completed already
                        await s.execute("migrate-start-postcopy")
                source = await _until_done(s, deadline)
                destination = await _until_done(d, deadline)
            verify: dict[str, Any] = {}
            if destination.get("status") == "completed":
                await asyncio.sleep(0.3)  # the moved guest goes on writing there
                verify = await d.execute("x-guest-verify")
            status = await s.execute("query-status")
            for client in (d, s):
                with contextlib.suppress(Exception):
                    await client.execute("quit")
        finally:
            for client in (d, s):
                with contextlib.suppress(Exception):  # EOF after quit
                    await client.disconnect()
        for engine in (dst, src):
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.process.wait(15)
        return QmpResult(source, destination, verify, status, dst.stderr() + src.stderr())
    finally:
        dst.kill()
        src.kill()


def migrate_with_qmp(cell: Cell, *, switch_after: float = 0.0) -> QmpResult:
    """Two ``trimig run`` engines, the same QMP sequence a QEMU user sends."""
    with tempfile.TemporaryDirectory(prefix="tmqmp") as directory:
        return asyncio.run(_qmp_migration(cell, directory, switch_after))


@contextlib.contextmanager
def cpu_contention(processes: int | None = None) -> Iterator[None]:
    """A busy process on each core while the block runs."""
    count = processes or os.cpu_count() or 2
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in busy:
            _kill(process)
