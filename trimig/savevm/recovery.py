"""The source's side of postcopy pause and recovery: the migration's layer that pauses
and recovers it, the handshake on a new connection, and the automatic policy
(x-postcopy-auto-recover) that retries it.

``PostcopyRecovery`` is a layer of OutgoingMigration (see source_state.py): migrate-pause,
postcopy-paused after a break past the switch, and ``recover`` over a new connection.

``ResumeHandshake`` is one attempt's exchange (docs/postcopy.md, "Recovery"): a
RECV_BITMAP command per block, the destination's received bitmaps (read by the return
path and handed to ``received_bitmap``), every page not received made dirty again, then
POSTCOPY_RESUME and its RESUME_ACK(1). ``OutgoingMigration.recover`` owns the connection
and runs it between the two halves (with preempt it reconnects the urgent channel in
between, as QEMU does).

``survive`` runs a migration and, after each pause, recovers it to the same address by
itself, with a backoff between attempts and a budget of consecutive failed ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio
from trio_util import AsyncValue

from .. import codec
from .._trio import open_nursery, sole_error
from ..channel import MigrationChannel
from ..codec.constants import RESUME_ACK_VALUE
from ..errors import (
    ConfigError,
    MigrationPaused,
    RemoteProtocolError,
    TransportError,
    forget_locals,
)
from ..migration import MigrationStatus
from ..postcopy import PageBitmap
from ..ram_blocks import RamBlock
from ..trace import trace
from ..transports import shutdown_stream
from .postcopy import UrgentSender
from .ram_saver import RamSaver
from .return_path import SourceReturnPath, answer_timeout
from .source_state import CLEANUP_TIMEOUT
from .switch import PostcopySwitch

log = logging.getLogger("trimig.savevm.recovery")

#: The longest wait between two automatic recovery attempts.
MAX_BACKOFF = 10.0


class ResumeHandshake:
    """One recovery attempt's handshake; ``timeout`` bounds each wait for the destination
    (which may still be noticing the break on its side: its x-channel-timeout)."""

    def __init__(self, blocks: Sequence[RamBlock], *, timeout: float) -> None:
        self._blocks = list(blocks)
        self._timeout = timeout
        self._bitmaps: dict[str, bytes] = {}
        self._bitmaps_received = trio.Event()
        self._acked = trio.Event()

    # -- what the return path delivers ---------------------------------------------------

    def received_bitmap(self, event: codec.RpRecvBitmap) -> None:
        names = {block.name for block in self._blocks}
        if event.block not in names:
            raise RemoteProtocolError(f"received bitmap of unknown RAM block {event.block!r}")
        self._bitmaps[event.block] = event.bitmap
        if len(self._bitmaps) == len(names):
            self._bitmaps_received.set()

    def resume_acked(self, value: int) -> None:
        if value != RESUME_ACK_VALUE:
            raise RemoteProtocolError(f"RESUME_ACK with value {value} (expected 1)")
        self._acked.set()

    # -- the two halves ------------------------------------------------------------------

    async def sync_bitmaps(self, channel: MigrationChannel, ram: RamSaver) -> None:
        """Ask for each block's received bitmap; make every page not received dirty (those
        lost in flight included) and restart the scan and the block naming."""
        for block in self._blocks:
            channel.put(codec.encode_recv_bitmap(block.name))
        await channel.flush()
        await self._wait(self._bitmaps_received, "received bitmaps")
        for block in self._blocks:
            npages = block.size // codec.TARGET_PAGE_SIZE
            received = PageBitmap.from_le_bytes(self._bitmaps[block.name], npages)
            ram.dirty[block.name][:] = ~received.bits
        ram.encoder.reset()  # the first record on the new channel names its block
        ram.move_cursor(self._blocks[0].name, 0)
        trace("postcopy_recover_bitmaps", dirty_pages=ram.dirty_pages)

    async def resume(self, channel: MigrationChannel) -> None:
        """POSTCOPY_RESUME, then wait for RESUME_ACK(1)."""
        channel.put(codec.encode_postcopy_resume())
        await channel.flush()
        await self._wait(self._acked, "RESUME_ACK")

    async def _wait(self, event: trio.Event, what: str) -> None:
        with trio.move_on_after(self._timeout) as bound:
            await event.wait()
        if bound.cancelled_caught:
            raise TransportError(f"the destination sent no {what} within {self._timeout:g} s")


class PostcopyRecovery(PostcopySwitch):
    """A layer of OutgoingMigration (see source_state.py): migrate-pause, the pause
    after a break past the switch, and the recovery over a new connection."""

    #: The handshake of the recovery attempt under way.
    _handshake: ResumeHandshake | None = None

    def pause(self) -> None:
        """migrate-pause: break the channels of a running postcopy on purpose (QEMU shuts
        the socket down); the migration then pauses, ready for ``recover``."""
        self._require_pausable()
        self._pause_requested = True
        for channel in (self._channel, self._urgent):
            if channel is not None:
                shutdown_stream(channel.stream)

    def begin_recovery(self) -> None:
        """The synchronous start of ``recover`` (migrate resume=true): postcopy-paused ->
        postcopy-recover-setup, or ConfigError naming the state the migration is in."""
        status = self.status.value
        if status is not MigrationStatus.POSTCOPY_PAUSED:
            raise ConfigError(
                "migrate with resume=true needs a paused postcopy (postcopy-paused); the "
                f"outgoing migration is {status.value}"
            )
        self._set_status(MigrationStatus.POSTCOPY_RECOVER_SETUP)

    def _pause(self, exc: BaseException, uri: str) -> None:
        """After the switch: postcopy-paused (the guest lives in two halves) and raise
        MigrationPaused, or re-raise a cancellation."""
        if self._pause_requested:
            reason = "paused by migrate-pause"
        else:
            reason = str(sole_error(exc)) or type(sole_error(exc)).__name__
        self._pause_requested = False
        self.stats.error_desc = reason
        self._urgent_sender = None  # its channel is gone: the return-path thread must not use it
        self._set_status(MigrationStatus.POSTCOPY_PAUSED)
        log.warning("postcopy to %s paused: %s", uri, reason)
        if isinstance(exc, Exception):
            raise MigrationPaused(f"postcopy to {uri} broke after the switch: {reason}") from exc
        raise exc

    async def recover(self, uri: str) -> None:
        """Resume a paused postcopy over a new connection to ``uri`` (QEMU's migrate with
        resume=true). Returns once the migration completed; raises MigrationPaused (the
        migration back in postcopy-paused, ready for another attempt) if the connection or
        the handshake fails or the link breaks again.

        The handshake (docs/postcopy.md, "Recovery"): RECV_BITMAP for each block, the
        destination's received bitmaps, every page not received dirty again; the urgent
        channel reconnected; POSTCOPY_RESUME, RESUME_ACK(1); then the background stream
        goes on where it is and the destination re-sends the requests it still waits for.
        """
        if self.status.value is MigrationStatus.POSTCOPY_PAUSED:
            self.begin_recovery()
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER_SETUP or self._ram is None:
            raise ConfigError(f"no paused postcopy to recover ({self.status.value.value})")
        for old in (self._channel, self._urgent):
            if old is not None:
                self._bytes_before += old.bytes_sent
        self._channel = self._urgent = None
        try:
            stream = await self._connect(uri)
            try:
                self._channel = channel = MigrationChannel(stream)
                self._set_status(MigrationStatus.POSTCOPY_RECOVER)
                self._return_path = SourceReturnPath(self)
                self._work = trio.CancelScope()
                # The destination may take its x-channel-timeout to notice the break first.
                channel_timeout = self.parameters.channel_timeout
                timeout = answer_timeout(channel_timeout)
                self._handshake = ResumeHandshake(self.blocks, timeout=timeout)
                async with open_nursery() as nursery:
                    await nursery.start(self._return_path.read, channel)
                    with self._work:
                        await self._resume_postcopy(channel, self._ram, uri)
                    self._raise_if_broken()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    if self._urgent is not None:
                        await self._urgent.aclose()
                    if self._channel is not None:
                        await self._channel.aclose()
                    else:
                        await stream.aclose()
        except BaseException as exc:
            forget_locals(exc)
            self._pause(exc, uri)
        self._completed()

    async def _resume_postcopy(self, channel: MigrationChannel, ram: RamSaver, uri: str) -> None:
        assert self._handshake is not None
        await self._handshake.sync_bitmaps(channel, ram)
        if self.capabilities.postcopy_preempt:
            self._urgent = MigrationChannel(await self._connect(uri))
        self._urgent_sender = UrgentSender(ram, self._urgent)
        await self._handshake.resume(channel)
        self.stats.error_desc = ""  # recovered: the pause's reason is history
        self.recoveries += 1
        self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
        log.info("postcopy to %s resumed: %d pages to send", uri, ram.dirty_pages)
        await self._postcopy_stream(channel, ram, self._urgent_sender, hold=None)

    def received_bitmap(self, event: codec.RpRecvBitmap) -> None:
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER or not self._handshake:
            raise RemoteProtocolError("a received bitmap outside postcopy recovery")
        self._handshake.received_bitmap(event)

    def resume_acked(self, value: int) -> None:
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER or not self._handshake:
            raise RemoteProtocolError("RESUME_ACK outside postcopy recovery")
        self._handshake.resume_acked(value)


class Recoverable(Protocol):
    """What ``survive`` needs of a migration (OutgoingMigration)."""

    @property
    def status(self) -> AsyncValue[MigrationStatus]: ...

    @property
    def recoveries(self) -> int: ...

    async def run(self, uri: str) -> None: ...

    async def recover(self, uri: str) -> None: ...


async def survive(
    migration: Recoverable, uri: str, *, attempts: int, backoff: float, resume: bool = False
) -> None:
    """``migration.run(uri)`` (``recover`` with ``resume``), and after each pause up to
    ``attempts`` consecutive recovery attempts to ``uri``, ``backoff`` seconds before the
    first, doubling up to MAX_BACKOFF. A recovery that reached postcopy-active restores
    the budget. Raises the last MigrationPaused once the budget is spent (or at once with
    no budget); returns once the migration completed."""
    try:
        await (migration.recover(uri) if resume else migration.run(uri))
        return
    except MigrationPaused as exc:
        error = exc
    failed, delay = 0, backoff
    while failed < attempts:
        await trio.sleep(delay)
        if migration.status.value is not MigrationStatus.POSTCOPY_PAUSED:
            return  # an operator resumed it meanwhile (migrate resume=true)
        before = migration.recoveries
        try:
            await migration.recover(uri)
            return
        except MigrationPaused as exc:
            error = exc
        if migration.recoveries > before:
            failed, delay = 0, backoff  # it ran again, then broke again: a new pause
        else:
            failed += 1
            delay = min(delay * 2, MAX_BACKOFF)
        log.warning("automatic recovery attempt %d of %d failed: %s", failed, attempts, error)
    raise error
