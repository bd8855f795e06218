"""The source's postcopy: the switch-over, urgent pages and the background stream.

The switch (QEMU's postcopy_start): stop the guest, a last exact sync of the dirty
log, canonicalise hugepage blocks to whole host pages, discard every dirty page on
the destination, then one PACKAGED blob with LISTEN, the device state and RUN. From
the moment the package is out the guest lives on the destination and the source
never resumes it.

Page requests arrive on the return path. With an urgent (preempt) channel the
return-path reader sends each requested host page at once on that second
connection, so a request never waits behind the megabytes of bulk data already
queued on the main channel; without one the background sender takes requests
before its next window. Either way the background scan continues from the
requested page.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import trio

from .. import codec
from ..channel import MigrationChannel, RateLimiter
from ..postcopy import PageRequest, PageRequestQueue, canonicalize, dirty_ranges
from ..ram import TARGET_PAGE_SIZE
from .ram import RamSaver

log = logging.getLogger("trimig.savevm.postcopy")

PING_AFTER_DISCARD = 2
PING_IN_PACKAGE = 3
PING_PACKAGE_LOADED = 0x42
PING_AFTER_PACKAGE = 4


def discard_commands(ram: RamSaver) -> list[bytes]:
    """POSTCOPY_RAM_DISCARD commands for every dirty page, hugepage blocks canonicalised."""
    commands: list[bytes] = []
    for block in ram.blocks:
        dirty = ram.dirty[block.name]
        per_host = block.page_size // TARGET_PAGE_SIZE
        if per_host > 1:
            dirty[:] = canonicalize(dirty, per_host)
        commands.extend(codec.encode_postcopy_ram_discards(block.name, dirty_ranges(dirty)))
    return commands


def package(device_section: bytes) -> bytes:
    """The PACKAGED blob: LISTEN, the device state, PING(3), PING(0x42), RUN."""
    return b"".join(
        (
            codec.encode_postcopy_listen(),
            device_section,
            codec.encode_ping(PING_IN_PACKAGE),
            codec.encode_ping(PING_PACKAGE_LOADED),
            codec.encode_postcopy_run(),
        )
    )


class UrgentSender:
    """Sends requested host pages, on the urgent channel when there is one."""

    def __init__(self, ram: RamSaver, urgent: MigrationChannel | None) -> None:
        self.ram = ram
        self.urgent = urgent
        self.encoder = codec.RamRecordEncoder()
        self.bytes_sent = 0

    def queue_request(self, channel: MigrationChannel, request: PageRequest) -> int:
        """Put the still-dirty target pages of the requested host page on ``channel``."""
        block = self.ram.by_name[request.block]
        first = request.start // TARGET_PAGE_SIZE
        count = request.length // TARGET_PAGE_SIZE
        dirty = self.ram.dirty[block.name][first : first + count]
        pages = np.flatnonzero(dirty) + first
        if len(pages) == 0:
            return 0  # already sent: it is in flight on the main channel
        dirty[:] = False
        self.ram.sent[block.name][pages] = True
        encoder = self.encoder if channel is self.urgent else self.ram.encoder
        rows = block.pages[pages]
        is_zero = rows.view(np.uint64).max(axis=1) == 0
        offsets = pages.astype(np.uint64) * TARGET_PAGE_SIZE
        queued = 0
        if is_zero.any():
            record = encoder.encode_zero_pages(block.name, offsets[is_zero])
            channel.put(record)
            queued += len(record)
            self.ram.stats.duplicate += int(is_zero.sum())
        if not is_zero.all():
            gather = encoder.encode_pages(block.name, offsets[~is_zero], block.mapping.buffer)
            channel.put_buffers(gather)
            queued += sum(len(part) for part in gather)
            self.ram.stats.normal += int((~is_zero).sum())
        self.ram.move_cursor(block.name, request.start + request.length)
        return queued

    async def send_now(self, request: PageRequest) -> None:
        """With an urgent channel: send the requested page at once and flush."""
        assert self.urgent is not None
        if self.queue_request(self.urgent, request):
            await self.urgent.flush()


async def send_background(
    channel: MigrationChannel,
    ram: RamSaver,
    requests: PageRequestQueue,
    urgent: UrgentSender,
    limiter: RateLimiter,
    *,
    section_id: int,
    flush_bytes: int,
    slice_seconds: float,
) -> None:
    """Stream every remaining dirty page in PART sections, requests first, until none is left."""
    while ram.dirty_pages:
        channel.put(codec.encode_section_part(section_id))
        deadline = time.monotonic() + slice_seconds
        queued = 0
        while time.monotonic() < deadline:
            request = requests.get_nowait() if urgent.urgent is None else None
            if request is not None:
                if urgent.queue_request(channel, request):
                    await channel.flush()
                continue
            window = ram.next_dirty_window()
            if window is None:
                break
            queued += ram.queue_window(channel, *window)
            if queued >= flush_bytes:
                await channel.flush()
                if limiter.rate and not requests.pending:
                    with trio.move_on_after(queued / limiter.rate):
                        await requests.wait_pending()
                queued = 0
        channel.put(codec.encode_end_of_section())
        channel.put(codec.encode_section_footer(section_id))
        await channel.flush()
        ram.stats.remaining = ram.remaining_bytes
