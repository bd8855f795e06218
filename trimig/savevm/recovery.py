"""The source's side of postcopy recovery: the handshake on a new connection, and the
automatic policy (x-postcopy-auto-recover) that retries it.

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
from ..channel import MigrationChannel
from ..codec.constants import RESUME_ACK_VALUE
from ..errors import MigrationPaused, RemoteProtocolError, TransportError
from ..migration import MigrationStatus
from ..postcopy import PageBitmap
from ..ram_blocks import RamBlock
from ..trace import trace
from .ram_saver import RamSaver

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
