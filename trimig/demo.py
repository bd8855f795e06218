"""Both sides of a migration on this machine: the engine of ``trimig demo``, tests and benchmarks.

The source engine runs in this trio process, the destination engine here too or in a
child ``trimig incoming`` (trimig/demo_process.py); each guest runs in its own process.
The stream crosses a real transport chosen by name.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, Protocol

import attrs
import trio

from ._trio import open_nursery
from .demo_process import destination_process as open_destination_process
from .demo_process import incoming_arguments
from .errors import ConfigError, MigrationFailed, MigrationPaused, TrimigError
from .guest.host import GuestProcess, Verdict, workload_command
from .loadvm.incoming import IncomingMigration
from .migration import TRANSPORT_NAMES, MigrationCapabilities, MigrationParameters, MigrationStatus
from .ram_blocks import RamBlock, RamBlockSpec, create_blocks
from .savevm.outgoing import OutgoingMigration
from .transports import MemoryFabric
from .transports.tls_credentials import TlsSettings

log = logging.getLogger("trimig.demo")

#: What shows a migration's progress for as long as it runs, given the source's
#: ``query()`` (the CLI's ``progress_shown``).
ProgressDisplay = Callable[[Callable[[], dict[str, Any]]], AbstractAsyncContextManager[object]]


@attrs.define
class LocalMigrationResult:
    """What a local migration produced: both sides' view and the destination guest's verdict."""

    source: dict[str, Any]
    destination: dict[str, Any]
    verdict: Verdict | None
    #: Why the source failed (MigrationFailed or MigrationPaused), with ``keep_failure``.
    error: TrimigError | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.source.get("status") == "completed"
            and self.verdict is not None
            and self.verdict.verified
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.source,
            "destination": self.destination,
            "verified": bool(self.verdict and self.verdict.verified),
            "verdict": self.verdict.raw if self.verdict else None,
        }


@asynccontextmanager
async def transport_uris(transport: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
    """Yield (listen URI, connect URI template, options) for a transport name.

    The connect URI may contain ``{address}``, replaced by the listener's real address.
    """
    if transport not in TRANSPORT_NAMES:
        raise ConfigError(
            f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORT_NAMES)}"
        )
    with tempfile.TemporaryDirectory(prefix="trimig-") as tmp:
        if transport == "unix":
            path = os.path.join(tmp, "migration.sock")
            yield f"unix:{path}", f"unix:{path}", {}
        elif transport == "tcp":
            yield "tcp:127.0.0.1:0", "{address}", {}
        elif transport == "exec":
            fifo = os.path.join(tmp, "stream.fifo")
            os.mkfifo(fifo)
            yield f"exec:cat {fifo}", f"exec:cat > {fifo}", {}
        else:
            fabric = MemoryFabric()
            yield "rdma:mem:demo", "rdma:mem:demo", {"fabric": fabric}


@asynccontextmanager
async def running_guest(
    specs: Sequence[RamBlockSpec], command: Sequence[str]
) -> AsyncIterator[tuple[GuestProcess, list[RamBlock]]]:
    """A new guest, running on fresh blocks; quit and freed on exit."""
    blocks = create_blocks(specs)
    try:
        guest = await GuestProcess.start(command)
        try:
            await guest.attach(blocks, "new")
            await guest.cont()
            yield guest, blocks
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await guest.aclose()
    finally:
        for block in blocks:
            block.close()


async def migrate_locally(
    specs: Sequence[RamBlockSpec],
    *,
    transport: str = "unix",
    guest_command: Sequence[str] | None = None,
    capabilities: MigrationCapabilities | None = None,
    parameters: MigrationParameters | None = None,
    warmup: float = 0.5,
    run_after: float = 0.3,
    progress: ProgressDisplay | None = None,
    postcopy_after_first_pass: bool = False,
    keep_failure: bool = False,
    tls: tuple[TlsSettings, TlsSettings] | None = None,
    destination_process: bool = False,
) -> LocalMigrationResult:
    """Start a guest, let it run ``warmup`` s, migrate it over ``transport``, verify it.

    A failed migration raises what ``OutgoingMigration.run`` raised, or, with
    ``keep_failure``, is returned: ``error`` holds it and ``source`` says ``failed``.
    ``progress``, if given, shows the migration's progress while it runs. ``tls`` is
    (the source's settings, the destination's): every channel is then TLS.

    The destination engine runs in this trio process, or with ``destination_process`` in
    a child ``trimig incoming`` (trimig/demo_process.py: the engines then have an
    interpreter each); not with ``rdma``, whose fabric is in this process."""
    command = list(guest_command or workload_command())
    capabilities = capabilities or MigrationCapabilities()
    parameters = parameters or MigrationParameters()
    if postcopy_after_first_pass:
        capabilities.set("postcopy-ram", True)
        parameters.set("x-postcopy-after-passes", 1)
    async with transport_uris(transport) as (listen_uri, connect_uri, options):
        listen_options, connect_options = dict(options), dict(options)
        if tls is not None:
            connect_options["tls"], listen_options["tls"] = tls
        if destination_process:
            if options:
                raise ConfigError(
                    f"transport {transport!r} is in this process: its destination runs here"
                )
            arguments = incoming_arguments(
                specs, command, capabilities, parameters, tls[1] if tls else None
            )
            ram_bytes = sum(spec.size for spec in specs)
            opened: AbstractAsyncContextManager[Destination] = open_destination_process(
                listen_uri, arguments, run_after=run_after, ram_bytes=ram_bytes
            )
        else:
            incoming = IncomingMigration(
                specs, guest_command=command, capabilities=capabilities,
                listen_options=listen_options,
            )  # fmt: skip
            opened = destination_here(incoming, listen_uri, run_after)
        async with opened as destination:
            async with (
                running_guest(specs, command) as (guest, blocks),
                open_nursery() as nursery,
            ):
                address = await nursery.start(destination.listen)
                await trio.sleep(warmup)
                outgoing = OutgoingMigration(
                    guest,
                    blocks,
                    capabilities=capabilities,
                    parameters=parameters,
                    connect_options=connect_options,
                )
                shown = progress(outgoing.query) if progress else nullcontext()
                error: TrimigError | None = None
                async with shown:
                    try:
                        await outgoing.run(connect_uri.format(address=address))
                    except (MigrationFailed, MigrationPaused) as exc:
                        if not keep_failure:
                            raise
                        error = exc
                await destination.settled()
            info, verdict = await destination.result()
            return LocalMigrationResult(outgoing.query(), info, verdict, error)


class Destination(Protocol):
    """The destination side of :func:`migrate_locally`: here (:class:`DestinationHere`) or
    a child process (:class:`trimig.demo_process.DestinationProcess`)."""

    async def listen(self, *, task_status: trio.TaskStatus[str]) -> None:
        """A task: listen, report the real address, receive the migration."""

    async def settled(self) -> None:
        """Once the source has ended: wait until the destination has too (or paused)."""

    async def result(self) -> tuple[dict[str, Any], Verdict | None]:
        """After :meth:`settled`: its query-migrate, its guest's verdict (None unless completed)."""


class DestinationHere:
    """The destination engine in this trio process: an IncomingMigration."""

    def __init__(self, incoming: IncomingMigration, listen_uri: str, run_after: float) -> None:
        self.incoming = incoming
        self._listen_uri = listen_uri
        self._run_after = run_after

    async def listen(self, *, task_status: trio.TaskStatus[str]) -> None:
        await receive(self.incoming, self._listen_uri, task_status=task_status)

    async def settled(self) -> None:
        await self.incoming.status.wait_value(
            lambda status: not status.is_running or status is MigrationStatus.POSTCOPY_PAUSED
        )

    async def result(self) -> tuple[dict[str, Any], Verdict | None]:
        verdict = await verify_destination(self.incoming, self._run_after)
        return self.incoming.query(), verdict


@asynccontextmanager
async def destination_here(
    incoming: IncomingMigration, listen_uri: str, run_after: float
) -> AsyncIterator[DestinationHere]:
    """:class:`DestinationHere` of ``incoming``, which is closed on exit."""
    try:
        yield DestinationHere(incoming, listen_uri, run_after)
    finally:
        await incoming.aclose()


async def receive(
    incoming: IncomingMigration, uri: str, *, task_status: trio.TaskStatus[str]
) -> None:
    """The destination's task: its failure shows in its status (the source's error is the
    one raised). A failure to listen (a bad URI, an address in use) is raised, through
    ``nursery.start``: nothing else would report it."""
    try:
        await incoming.listen_and_run(uri, task_status=task_status)
    except TrimigError as exc:
        if incoming.socket_address is None:
            raise
        log.info("incoming migration ended: %s", exc)


async def verify_destination(
    incoming: IncomingMigration, run_after: float, *, timeout: float | None = None
) -> Verdict | None:
    """Let the moved guest run ``run_after`` s, stop it and have it check its memory
    (within ``timeout`` s, default: the guest protocol's bound for its RAM size).

    None when the incoming migration did not complete. The guest and its blocks are
    closed afterwards.
    """
    if incoming.status.value is not MigrationStatus.COMPLETED:
        return None
    guest, blocks = incoming.take_guest()
    try:
        await trio.sleep(run_after)
        await guest.stop()
        return await guest.verify(timeout=timeout)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await guest.aclose()
        for block in blocks:
            block.close()
