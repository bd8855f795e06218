"""The state of one incoming migration, shared by its layers.

``IncomingMigration`` (incoming.py) is built in layers, as the source's migration is
(savevm/source_state.py), each a subclass of the one below:

- ``DestinationState`` (here): what the migration owns (the guest process, the RAM
  blocks, the return path, postcopy's state) and the steps every path takes: make
  the guest, start it, fail, close what is ours;
- ``PostcopyRecovery`` (recovery.py): migrate-pause, postcopy-paused after a break,
  and the recovery over a new connection (by hand or x-postcopy-auto-recover);
- ``IncomingMigration`` (incoming.py): listening, query-migrate, ``run``, the reading
  of the stream and its package, and mapped-ram files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from .. import codec
from ..guest.host import GuestProcess, close_guest
from ..migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from ..postcopy import PostcopyState
from ..ram_blocks import RamBlock, RamBlockSpec, create_blocks
from ..snapshot.lazy import LazyRestore
from ..status import DESTINATION, EventCallback, StatusHolder, StatusMachine
from ..transports import ByteStream
from .postcopy import PostcopyIncoming
from .ram_loader import RamLoader
from .reader import ReturnPathWriter

log = logging.getLogger("trimig.loadvm")

CLEANUP_TIMEOUT = 10.0


class DestinationState(StatusHolder):
    """One incoming migration's state (see the module's docstring for the layers)."""

    _direction = "incoming"

    def __init__(
        self,
        specs: Sequence[RamBlockSpec],
        *,
        guest_command: Sequence[str] | None = None,
        capabilities: MigrationCapabilities | None = None,
        parameters: MigrationParameters | None = None,
        listen_options: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
        prepared: tuple[GuestProcess, list[RamBlock]] | None = None,
    ) -> None:
        """``prepared``: a guest process already started (not attached) and fresh blocks
        of ``specs``, which this migration then owns (as it owns the ones it would make):
        an engine waiting for a migration starts them ahead, as QEMU's ``-incoming`` starts
        its VM, so no start-up falls inside the migration."""
        self.specs = list(specs)
        self.guest_command = guest_command
        self.capabilities = capabilities or MigrationCapabilities()
        self.parameters = parameters or MigrationParameters()
        #: QEMU's status, moved only along status.DESTINATION (an illegal move is our bug).
        self._status = StatusMachine(DESTINATION, "destination", self._status_changed)
        self.guest: GuestProcess | None = prepared[0] if prepared else None
        self.blocks: list[RamBlock] = list(prepared[1]) if prepared else []
        self.error_desc = ""
        self.start_ns = 0
        self.end_ns = 0
        self._listen_options = listen_options or {}
        self._on_event = on_event
        self._device_state: bytes | None = None
        self._return_path: ReturnPathWriter | None = None
        self._postcopy: PostcopyIncoming | None = None
        self._ram: RamLoader | None = None
        self._lazy: LazyRestore | None = None
        #: The real listening address (QEMU's socket-address), once listening.
        self.socket_address: str | None = None
        #: postcopy-* statistics, once postcopy ended.
        self.postcopy_stats: dict[str, object] = {}
        #: The main stream's decoder (a recovery's new channel continues its stream).
        self._decoder: codec.StreamDecoder | None = None
        #: The main stream now (migrate-pause shuts it down).
        self._stream: ByteStream | None = None
        self._pause_requested = False
        #: Recoveries that brought postcopy back to postcopy-active.
        self.recoveries = 0

    # -- steps every path takes ----------------------------------------------------------

    async def _prepare(self) -> None:
        """Create the RAM blocks and start the guest process (once)."""
        if self.guest is None:
            self.blocks = create_blocks(self.specs)
            self.guest = await GuestProcess.start(self.guest_command)

    async def _finish_postcopy(self, postcopy: PostcopyIncoming) -> None:
        await postcopy.done.wait()
        if postcopy.error is not None:
            raise postcopy.error
        await postcopy.finish()

    def _guest_runs_here(self) -> bool:
        """Postcopy ran the guest here: a failure now pauses, and sends no SHUT."""
        return self._postcopy is not None and self._postcopy.state.state >= PostcopyState.RUNNING

    async def _send_shut_failed(self) -> None:
        """SHUT(1) on the return path, if one is open (QEMU's destination does the same on
        a failed load), while the connection is still up."""
        if self._return_path is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await self._return_path.send(codec.encode_rp_shut(1))
            except Exception:
                log.debug("could not send SHUT(1)", exc_info=True)

    async def _fail(self, exc: BaseException) -> None:
        self.error_desc = str(exc) or type(exc).__name__
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            await self.aclose()
        self._set_status(MigrationStatus.FAILED)

    async def aclose(self) -> None:
        """Stop the guest (if still ours) and free the blocks. Safe to call more than once."""
        if self._lazy is not None:
            self._lazy.close()
        if self._postcopy is not None:
            # Closing our uffd ends the registration: a guest blocked on a missing page
            # (postcopy-paused) wakes and can be told to quit.
            self._postcopy.close()
        guest, blocks = self.guest, self.blocks
        self.guest, self.blocks = None, []
        await close_guest(guest, blocks)

    async def _start_guest(self) -> None:
        assert self.guest is not None and self._device_state is not None
        if self._postcopy is not None:
            # Postcopy was advised, so the guest attached for it (PostcopyIncoming.advise).
            await self._postcopy.release_guest()
        else:
            await self.guest.attach(self.blocks, "incoming")
        await self.guest.load_state(self._device_state)
        await self.guest.cont()
        if self._on_event:
            self._on_event("RESUME", {})
