"""The destination of a local migration in a child process: ``trimig incoming``.

:func:`trimig.demo.migrate_locally` with ``destination_process=True`` (what ``trimig
demo`` does) runs its destination engine as a child ``trimig incoming LISTEN_URI --json``
instead of in its own trio process, so that the two engines do not share one
interpreter (and its GIL). The child gets the same guest, the capabilities and
parameters a destination uses and the destination's TLS settings as its options; its
``--json`` output is the destination's query-migrate and the moved guest's verdict.

The child is bounded: it must listen within :data:`LISTEN_TIMEOUT` seconds and exit
within a bound after the source's end (run-after, the guest's verify bound for its RAM,
:data:`EXIT_MARGIN`); it runs in its own process group, killed and reaped on the way
out whatever happened.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from .errors import ConfigError, MigrationFailed, exit_status
from .guest.host import SECONDS_PER_RAM_BYTE, Verdict
from .migration import MigrationCapabilities, MigrationParameters
from .ram_blocks import RamBlockSpec, default_block_specs
from .transports.tls_credentials import TlsSettings

log = logging.getLogger("trimig.demo")

#: The command of the destination process, before its URI and options.
INCOMING_COMMAND = (sys.executable, "-m", "trimig.cli", "incoming")
#: Seconds the child may take to listen (its interpreter and the engine's imports).
LISTEN_TIMEOUT = 60.0
#: Seconds the child may take to exit after the source's end, beyond its run-after and
#: its guest's verify bound (the guest's stop and quit, its JSON).
EXIT_MARGIN = 30.0
#: Seconds the shielded cleanup waits for the killed child.
REAP_TIMEOUT = 10.0
LISTENING = "trimig: listening on "


def incoming_arguments(
    specs: Sequence[RamBlockSpec],
    guest_command: Sequence[str],
    capabilities: MigrationCapabilities,
    parameters: MigrationParameters,
    tls: TlsSettings | None,
) -> list[str]:
    """The options of ``trimig incoming`` for a destination of this guest (the words after
    its URI): its RAM layout (``--ram``, ``--huge``), what a destination uses of the
    capabilities and parameters (postcopy, x-channel-timeout), the destination's TLS
    settings, the guest command. No automatic recovery: the local source does not recover
    a paused postcopy. ConfigError for what the options cannot express."""
    main = specs[0] if specs else None
    huge = specs[1].size if len(specs) == 2 else 0
    if main is None or list(specs) != default_block_specs(main.size, huge=huge):
        layout = ", ".join(f"{spec.name} ({spec.size} bytes)" for spec in specs)
        raise ConfigError(
            "a destination process takes the built-in RAM layout (pc.ram, and pc.huge of "
            f"2 MiB pages: --ram, --huge), not {layout or 'no block'}"
        )
    arguments = ["--ram", str(main.size), "--huge", str(huge)]
    arguments += ["--channel-timeout", str(parameters.x_channel_timeout), "--auto-recover", "0"]
    if capabilities.postcopy_ram:
        arguments.append("--postcopy")
        if not capabilities.postcopy_preempt:
            arguments.append("--no-preempt")
    if tls is not None:
        credentials = tls.credentials
        if tls.authz is not None or not credentials.verify_peer:
            raise ConfigError(
                "a destination process takes TLS credentials and a host name only "
                "(no authz, no verify-peer=off)"
            )
        arguments += ["--tls-creds", credentials.directory, "--tls-hostname", tls.hostname]
    return [*arguments, "--", *guest_command]


def verbosity_options() -> list[str]:
    """``-v`` as often as this process's logging level asks, for the child to log as it does."""
    level = logging.getLogger().getEffectiveLevel()
    return ["-v"] * min(2, max(0, (logging.WARNING - level) // 10))


class DestinationProcess:
    """A started child ``trimig incoming``: :meth:`listen` (a task: reports its address,
    then reads its output until it exits), :meth:`settled` once the source has ended,
    :meth:`result` after that."""

    def __init__(self, process: trio.Process, *, exit_timeout: float) -> None:
        self._process = process
        self._exit_timeout = exit_timeout
        self._stdout = bytearray()
        self._errors: list[str] = []
        self._exited = trio.Event()
        #: Why the child's own result does not count (it hung and was killed).
        self._failure: str | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def name(self) -> str:
        return f"the destination process (trimig incoming, pid {self.pid})"

    async def listen(self, *, task_status: trio.TaskStatus[str]) -> None:
        """Report the child's address once it listens (MigrationFailed if it exits first or
        says nothing within LISTEN_TIMEOUT), then read its output until it exits."""
        assert self._process.stdout is not None and self._process.stderr is not None
        stderr = LineReader(self._process.stderr)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stdout, self._process.stdout)
            address = None
            with trio.move_on_after(LISTEN_TIMEOUT):
                address = await self._read_stderr(stderr, until=LISTENING)
            if address is None:
                raise await self._not_listening()
            task_status.started(address)
            await self._read_stderr(stderr)
        await self._process.wait()
        self._exited.set()

    async def settled(self) -> None:
        """Wait for the child's exit after the source's end, within its bound; kill it past that."""
        with trio.move_on_after(self._exit_timeout):
            await self._exited.wait()
            return
        self._failure = f"{self.name} did not exit within {self._exit_timeout:.1f} s: killed"
        kill_group(self._process)

    async def result(self) -> tuple[dict[str, Any], Verdict | None]:
        """The destination's query-migrate and its guest's verdict, from the child's JSON;
        a failure naming how the child ended when it has none (or hung)."""
        info = _last_json(self._stdout)
        if self._failure is not None or info is None:
            return {"status": "failed", "error-desc": self._failure or self._how_it_ended()}, None
        info.pop("verified", None)
        raw = info.pop("verdict", None)
        if not isinstance(raw, dict):
            return info, None
        return info, Verdict(bool(raw.get("verified")), str(raw.get("detail", "")), raw)

    def _how_it_ended(self) -> str:
        ended = f"{self.name} {exit_status(self._process.returncode)}"
        return f"{ended}: {self._errors[-1]}" if self._errors else ended

    async def _not_listening(self) -> MigrationFailed:
        with trio.move_on_after(REAP_TIMEOUT / 2):
            await self._process.wait()
        if self._process.returncode is None:
            kill_group(self._process)
            return MigrationFailed(f"{self.name} did not listen within {LISTEN_TIMEOUT:.0f} s")
        return MigrationFailed(f"{self._how_it_ended()} (before listening)")

    async def _read_stderr(self, stderr: LineReader, *, until: str | None = None) -> str | None:
        """Take the child's stderr lines to its EOF, or until one starts with ``until``:
        the rest of that one. Its own messages (``trimig: ...``) are kept; anything else
        (its log) is passed on to this process's stderr."""
        while (line := await stderr.next_line()) is not None:
            if until is not None and line.startswith(until):
                return line[len(until) :]
            if line.startswith("trimig: "):
                self._errors.append(line.removeprefix("trimig: ").removeprefix("error: "))
            else:
                print(f"destination: {line}", file=sys.stderr, flush=True)
        return None

    async def _read_stdout(self, stream: trio.abc.ReceiveStream) -> None:
        while data := await stream.receive_some():
            self._stdout += data


@asynccontextmanager
async def destination_process(
    listen_uri: str,
    arguments: Sequence[str],
    *,
    run_after: float,
    ram_bytes: int,
    exit_margin: float = EXIT_MARGIN,
) -> AsyncIterator[DestinationProcess]:
    """Start ``trimig incoming LISTEN_URI --json --exit-with-parent`` with ``arguments``
    (see :func:`incoming_arguments`); on exit kill its process group (whatever of it is
    left: the child, or the guest of a child that died) and reap it. A demo killed outright
    runs no cleanup: the child then stops of itself (``--exit-with-parent``)."""
    *python, module, incoming = INCOMING_COMMAND
    command = [
        *python,
        module,
        *verbosity_options(),
        incoming,
        listen_uri,
        "--json",
        "--exit-with-parent",
    ]
    process = await trio.lowlevel.open_process(
        [*command, "--run-after", str(run_after), *arguments],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    exit_timeout = run_after + exit_margin + ram_bytes * SECONDS_PER_RAM_BYTE
    try:
        yield DestinationProcess(process, exit_timeout=exit_timeout)
    finally:
        with trio.CancelScope(shield=True):
            kill_group(process)
            with trio.move_on_after(REAP_TIMEOUT):
                await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
            if process.returncode is None:
                log.error("the destination process %d did not die when killed", process.pid)


def kill_group(process: trio.Process) -> None:
    """SIGKILL the process group of a child started with ``process_group=0``: it and its
    own children (its guest), also once it is reaped (its id cannot be reused while
    the group has members)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class LineReader:
    """The lines of a byte stream, decoded, without their end of line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._pending = b""
        self._eof = False

    async def next_line(self) -> str | None:
        """The next line (the last one may lack its end of line); None at the stream's EOF."""
        while b"\n" not in self._pending and not self._eof:
            data = await self._stream.receive_some()
            self._eof = not data
            self._pending += data
        if not self._pending:
            return None
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")


def _last_json(output: bytes | bytearray) -> dict[str, Any] | None:
    """The last line of ``output`` that is a JSON object, None if none is."""
    for line in reversed(bytes(output).decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return None
