"""A long-running engine: one guest, its RAM, and the migrations that move it.

``trimig run`` serves an Engine over QMP; a trio application can embed one too.
The engine's nursery owns every migration task; commands that start one return
at once, as QMP's do, and progress is read with ``query_migrate`` or events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._trio import open_nursery
from .errors import ConfigError, MigrationPaused
from .guest.host import GuestProcess, close_guest
from .loadvm.incoming import IncomingMigration
from .migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from .objects import ObjectRegistry
from .qmp.api import EngineEvent
from .ram_blocks import RamBlock, RamBlockSpec, create_blocks
from .savevm.outgoing import OutgoingMigration
from .savevm.recovery import survive
from .transports import FileAddress, Listener, TcpAddress, UnixAddress, parse_uri
from .transports.tls import check_client_settings

log = logging.getLogger("trimig.engine")

EVENT_BUFFER = 256


class Engine:
    """Implements trimig.qmp.api.EngineControl. Use ``async with open_engine(...)``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        specs: Sequence[RamBlockSpec],
        guest_command: Sequence[str],
        *,
        incoming: bool = False,
    ) -> None:
        self._nursery = nursery
        self.specs = list(specs)
        self.guest_command = list(guest_command)
        self.capabilities = MigrationCapabilities()
        self.parameters = MigrationParameters()
        #: object-add's objects: TLS credentials and authz lists, by id.
        self.objects = ObjectRegistry()
        self.guest: GuestProcess | None = None
        self.blocks: list[RamBlock] = []
        self.migration: OutgoingMigration | IncomingMigration | None = None
        self._migration_scope: trio.CancelScope | None = None
        #: The task accepting postcopy recovery attempts (migrate-recover), if any.
        self._recovery_scope: trio.CancelScope | None = None
        self._incoming_allowed = incoming
        self._run_state = "inmigrate" if incoming else "prelaunch"
        self._subscribers: set[trio.MemorySendChannel[EngineEvent]] = set()
        self.quit_requested = trio.Event()
        #: An incoming engine's guest process and blocks, started ahead of migrate-incoming.
        self._prepared: tuple[GuestProcess, list[RamBlock]] | None = None
        #: The real address an incoming migration listens on (``tcp:HOST:PORT`` with the
        #: bound port when port 0 was asked for); None until migrate-incoming listens.
        self.incoming_address: str | None = None
        #: The last migration saved the guest to a file: it still lives here (QEMU's
        #: postmigrate after ``migrate file:...`` accepts ``cont`` and another migrate).
        self._saved_to_file = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start_guest(self) -> None:
        """Create the RAM blocks and start the guest running (a source engine)."""
        self.blocks = create_blocks(self.specs)
        self.guest = await GuestProcess.start(self.guest_command)
        await self.guest.attach(self.blocks, "new")
        await self.guest.cont()
        self._run_state = "running"

    async def prepare_incoming(self) -> None:
        """Create the RAM blocks and start the (not yet attached) guest process that the
        next incoming migration loads into, as QEMU's ``-incoming`` creates its VM at
        start-up: the destination is ready when the source connects, and no process
        start-up falls inside the migration (or inside a postcopy switch-over)."""
        blocks = create_blocks(self.specs)
        try:
            guest = await GuestProcess.start(self.guest_command)
        except BaseException:
            for block in blocks:
                block.close()
            raise
        self._prepared = (guest, blocks)

    async def aclose(self) -> None:
        if self._migration_scope is not None:
            self._migration_scope.cancel()
        if self._prepared is not None:
            prepared, self._prepared = self._prepared, None
            await close_guest(*prepared)
        if isinstance(self.migration, IncomingMigration):
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.migration.aclose()
        await self._close_guest()
        for channel in list(self._subscribers):
            channel.close()

    # -- events ------------------------------------------------------------------------

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        """Deliver an event to every subscriber, stamped now: the moment it happened (the
        QMP server may only get to it after the migration's next synchronous step)."""
        if name.startswith("MIGRATION") and not self.capabilities.events:
            return
        timestamp = time.time()
        for channel in list(self._subscribers):
            try:
                channel.send_nowait((name, data, timestamp))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("dropping event %s for a slow or gone subscriber", name)

    @asynccontextmanager
    async def subscribe_events(
        self,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[EngineEvent]]:
        send, receive = trio.open_memory_channel[EngineEvent](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    # -- settings ----------------------------------------------------------------------

    def _refuse_while_migrating(self, what: str) -> None:
        if self.migration is not None and self.migration.status.value.is_running:
            raise ConfigError(f"cannot {what} while a migration is running")

    def set_capabilities(self, capabilities: dict[str, bool]) -> None:
        self._refuse_while_migrating("change capabilities")
        for name, state in capabilities.items():
            self.capabilities.set(name, state)

    def query_capabilities(self) -> list[dict[str, Any]]:
        return self.capabilities.query()

    def set_parameters(self, parameters: dict[str, Any]) -> None:
        for name, value in parameters.items():
            self.parameters.set(name, value)
        if isinstance(self.migration, OutgoingMigration):
            self.migration.set_max_bandwidth(self.parameters.max_bandwidth)

    def query_parameters(self) -> dict[str, Any]:
        return self.parameters.query()

    def object_add(self, arguments: dict[str, Any]) -> None:
        self.objects.add(arguments)

    def object_del(self, object_id: str) -> None:
        self.objects.delete(object_id)

    # -- migration ---------------------------------------------------------------------

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        if resume:
            await self._resume_outgoing(uri)
            return
        self._refuse_while_migrating("start another migration")
        if self.guest is None:
            raise ConfigError("there is no guest here to migrate (the engine is waiting for one)")
        if self._run_state == "postmigrate" and not self._saved_to_file:
            raise ConfigError("the guest has already been migrated away")
        # A malformed URI is the command's error, not a failed migration.
        address = parse_uri(uri)
        self._saved_to_file = isinstance(address, FileAddress)
        tls = self.objects.tls_settings(self.parameters.query(), incoming=False)
        if tls is not None:
            check_client_settings(tls, address)  # wrong endpoint, no host name: refused now
        outgoing = OutgoingMigration(
            self.guest,
            self.blocks,
            capabilities=self.capabilities,
            parameters=self.parameters,
            connect_options={"tls": tls} if tls is not None else None,
            on_event=self._on_outgoing_event,
        )
        self.migration = outgoing
        self._nursery.start_soon(self._run_outgoing, outgoing, uri)
        await outgoing.status.wait_value(lambda s: s is not MigrationStatus.NONE)

    def _on_outgoing_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "STOP":
            self._run_state = "finish-migrate"
        elif name == "MIGRATION" and data.get("status") == MigrationStatus.COMPLETED.value:
            # In the same step as the status: a query-status right after query-migrate
            # said completed must not see finish-migrate (QEMU sets the run state first).
            self._run_state = "postmigrate"
        self._emit(name, data)

    async def _resume_outgoing(self, uri: str) -> None:
        """migrate resume=true: recover the paused outgoing postcopy over ``uri``."""
        outgoing = self.migration
        if not isinstance(outgoing, OutgoingMigration):
            raise ConfigError(
                "migrate with resume=true needs a paused outgoing postcopy; the engine is "
                f"{self._state_words()}"
            )
        parse_uri(uri)
        outgoing.begin_recovery()  # ConfigError naming the state unless postcopy-paused
        self._nursery.start_soon(self._run_outgoing, outgoing, uri, True)

    def migrate_pause(self) -> None:
        migration = self.migration
        if migration is None:
            raise ConfigError(f"migrate-pause needs a running postcopy; {self._state_words()}")
        migration.pause()

    async def migrate_recover(self, uri: str) -> None:
        """Listen on ``uri`` for the source's recovery connection (replacing an earlier
        migrate-recover's listener); each connection accepted there is a recovery attempt."""
        incoming = self.migration
        paused = incoming is not None and incoming.status.value is MigrationStatus.POSTCOPY_PAUSED
        if not isinstance(incoming, IncomingMigration) or not paused:
            raise ConfigError(
                "migrate-recover needs a paused incoming postcopy (postcopy-paused); the "
                f"engine is {self._state_words()}"
            )
        parse_uri(uri)
        listener = await incoming.recovery_listener(uri)
        if self._recovery_scope is not None:
            self._recovery_scope.cancel()
        self.incoming_address = str(listener.address)
        self._nursery.start_soon(self._run_recovery, incoming, listener)

    async def _run_recovery(self, incoming: IncomingMigration, listener: Listener) -> None:
        """Accept recovery attempts on ``listener`` until one completes the migration."""
        with trio.CancelScope() as scope:
            self._recovery_scope = scope
            try:
                while incoming.status.value is MigrationStatus.POSTCOPY_PAUSED:
                    stream = await listener.accept()
                    try:
                        await incoming.recover(stream, listener=listener)
                    except MigrationPaused as exc:
                        log.warning("postcopy recovery on %s failed: %s", listener.address, exc)
            except Exception as exc:
                log.warning("postcopy recovery on %s ended: %s", listener.address, exc)
            finally:
                if self._recovery_scope is scope:
                    self._recovery_scope = None
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await listener.aclose()
        self._incoming_ended(incoming)

    async def _run_outgoing(
        self, outgoing: OutgoingMigration, uri: str, resume: bool = False
    ) -> None:
        with trio.CancelScope() as scope:
            self._migration_scope = scope
            try:
                await survive(
                    outgoing,
                    uri,
                    attempts=self.parameters.x_postcopy_auto_recover,
                    backoff=self.parameters.x_postcopy_recover_backoff / 1000,
                    resume=resume,
                )
            except Exception as exc:
                log.warning("migration to %s failed: %s", uri, exc)
            else:
                self._run_state = "postmigrate"
            finally:
                self._migration_scope = None
        if outgoing.status.value in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            self._run_state = "running" if self.guest and self.guest.running else "paused"

    async def migrate_incoming(self, uri: str) -> None:
        """Listen on ``uri``; returns once listening (``incoming_address`` is then known).

        Refused on an engine not started for incoming, or once an incoming migration has
        started listening; a listen failure (bad URI, address in use) is this call's error and
        leaves migrate-incoming allowed, as in QEMU. After a failed incoming migration the
        engine accepts migrate-incoming again (QEMU would exit, with exit-on-error).
        """
        if not self._incoming_allowed:
            if isinstance(
                self.migration, IncomingMigration
            ) and self.migration.status.value not in (
                MigrationStatus.NONE,
                MigrationStatus.FAILED,
                MigrationStatus.COMPLETED,
            ):
                raise ConfigError(
                    f"an incoming migration has already been started (it is "
                    f"{self.migration.status.value.value})"
                )
            if not self._guest_left():
                raise ConfigError(
                    "migrate-incoming needs an engine without a guest (started with --incoming "
                    f"defer, or whose guest migrated away); the engine is {self._state_words()}"
                )
        parse_uri(uri)
        if self._guest_left():
            await self._release_departed_guest()
        tls = self.objects.tls_settings(self.parameters.query(), incoming=True)
        self._incoming_allowed = False
        incoming = IncomingMigration(
            self.specs,
            guest_command=self.guest_command,
            capabilities=self.capabilities,
            parameters=self.parameters,
            listen_options={"tls": tls} if tls is not None else None,
            on_event=self._emit,
            prepared=self._prepared,
        )
        self._prepared = None  # the migration owns them now (and closes them if it fails)
        self.migration = incoming
        try:
            await self._nursery.start(self._run_incoming, incoming, uri)
        except Exception:
            self._incoming_allowed = True
            raise

    def _guest_left(self) -> bool:
        """The guest migrated away from here (its outgoing migration completed to a
        destination, not a file): the engine may receive a new one."""
        return (
            isinstance(self.migration, OutgoingMigration)
            and self.migration.status.value is MigrationStatus.COMPLETED
            and not self._saved_to_file
        )

    async def _release_departed_guest(self) -> None:
        """Close the process and free the RAM of a guest that runs elsewhere now."""
        await self._close_guest()
        self._run_state = "inmigrate"

    async def _close_guest(self) -> None:
        """Close the engine's own guest and free its blocks (close_guest)."""
        guest, blocks = self.guest, self.blocks
        self.guest, self.blocks = None, []
        await close_guest(guest, blocks)

    async def _run_incoming(
        self,
        incoming: IncomingMigration,
        uri: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (errors before listening go to the starter), then load one migration."""
        listening = False
        with trio.CancelScope() as scope:
            self._migration_scope = scope
            try:
                async with open_nursery() as nursery:
                    self.incoming_address = await nursery.start(incoming.listen_and_run, uri)
                    listening = True
                    log.info("incoming migration listening on %s", self.incoming_address)
                    task_status.started()
            except Exception as exc:
                if not listening:
                    raise
                log.warning("incoming migration on %s failed: %s", uri, exc)
            finally:
                self._migration_scope = None
        self._incoming_ended(incoming)

    def _incoming_ended(self, incoming: IncomingMigration) -> None:
        if incoming.status.value is MigrationStatus.COMPLETED:
            self.guest, self.blocks = incoming.take_guest()
            self._run_state = "running"
        elif incoming.status.value is MigrationStatus.FAILED:
            # Nothing arrived that runs: this engine can wait for another migration.
            self._incoming_allowed = True

    def start_postcopy(self) -> None:
        migration = self.migration
        if not isinstance(migration, OutgoingMigration) or not migration.status.value.is_running:
            raise ConfigError("no outgoing migration is running")
        migration.start_postcopy()

    def cancel(self) -> None:
        migration = self.migration
        if migration is None or not migration.status.value.is_running:
            return
        if migration.status.value.is_postcopy:
            raise ConfigError(
                "postcopy is running: the guest lives on both sides; it cannot be cancelled"
            )
        if self._migration_scope is not None:
            self._migration_scope.cancel()

    def query_migrate(self) -> dict[str, Any]:
        if self.migration is None:
            return {}
        info = self.migration.query()
        if isinstance(self.migration, IncomingMigration) and self.incoming_address is not None:
            socket_address = qmp_socket_address(self.incoming_address)
            if socket_address is not None:
                info["socket-address"] = [socket_address]
        return info

    def query_status(self) -> dict[str, Any]:
        guest = self.guest
        if guest is None and isinstance(self.migration, IncomingMigration):
            guest = self.migration.guest  # in postcopy it runs before the migration completes
        running = bool(guest and guest.running)
        status = "running" if running else self._run_state
        if not running and status == "running":
            status = "paused"
        return {"running": running, "singlestep": False, "status": status}

    async def stop(self) -> None:
        if self.guest is None:
            raise ConfigError("there is no guest")
        await self.guest.stop()
        self._run_state = "paused"
        self._emit("STOP", {})

    async def cont(self) -> None:
        if self.guest is None:
            raise ConfigError("there is no guest")
        if self._run_state == "postmigrate" and not self._saved_to_file:
            raise ConfigError("the guest was migrated away; it runs on the destination")
        await self.guest.cont()
        self._run_state = "running"
        self._emit("RESUME", {})

    async def verify_guest(self) -> dict[str, Any]:
        guest = self.guest
        if guest is None and isinstance(self.migration, IncomingMigration):
            guest = self.migration.guest  # postcopy: it runs before the migration completes
        if guest is None:
            raise ConfigError(
                f"there is no guest here to verify (the engine is {self._state_words()})"
            )
        was_running = guest.running
        if was_running:
            await guest.stop()
        try:
            verdict = await guest.verify()
        finally:
            if was_running:
                await guest.cont()
        return {"verified": verdict.verified, "detail": verdict.detail}

    def dump_bitmaps(self) -> dict[str, Any]:
        if self.migration is None:
            raise ConfigError(
                f"there is no migration here whose bitmaps to dump (the engine is "
                f"{self._state_words()})"
            )
        return {"text": self.migration.dump_bitmaps()}

    def _state_words(self) -> str:
        status = self.migration.status.value.value if self.migration is not None else "none"
        return f"{self.query_status()['status']}, migration {status}"

    async def quit(self) -> None:
        self.quit_requested.set()


def qmp_socket_address(address: str) -> dict[str, Any] | None:
    """QEMU's ``SocketAddress`` for a listening URI (tcp or unix), else None."""
    parsed = parse_uri(address)
    if isinstance(parsed, TcpAddress):
        return {"type": "inet", "host": parsed.host, "port": str(parsed.port)}
    if isinstance(parsed, UnixAddress):
        return {"type": "unix", "path": parsed.path}
    return None


@asynccontextmanager
async def open_engine(
    specs: Sequence[RamBlockSpec], guest_command: Sequence[str], *, incoming: bool = False
) -> AsyncIterator[Engine]:
    """An engine whose tasks live in a nursery this context owns.

    On exit the engine's tasks (migrations) are cancelled and have ended before the guest is
    closed and the RAM freed.
    """
    engine: Engine | None = None
    try:
        async with open_nursery() as nursery:
            engine = Engine(nursery, specs, guest_command, incoming=incoming)
            try:
                if incoming:
                    await engine.prepare_incoming()
                else:
                    await engine.start_guest()
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if engine is not None:
            await engine.aclose()
