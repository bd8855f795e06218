"""The source's postcopy: the switch-over, urgent pages and the background stream.

The switch (QEMU's postcopy_start): stop the guest, a last exact sync of the dirty
log, canonicalise hugepage blocks to whole host pages, discard every dirty page on
the destination, then one PACKAGED blob with LISTEN, the device state and RUN. From
the moment the package is out the guest lives on the destination and the source
never resumes it.

Page requests arrive on the return path. With an urgent (preempt) channel the
return-path reader sends each requested host page at once on that second
connection, so a request never waits behind the megabytes of bulk data already
queued on the main channel; it sends it even if the main channel already carries it
(the destination faulted, so that copy is still on its way, and it drops the second).
Without one the background sender takes requests before its next window. Either way
the background scan continues from the requested page.

When both connections have thread streams (``threads.thread_stream``: sockets, TLS over
them) the return path is read by an OS thread
(``return_path.read_return_path``, run with ``trimig.threads.run_in_thread``) that
answers each request itself (``UrgentSender.send_from_thread``) the moment it arrives,
without waiting for the trio loop to come back from the background sender's bulk work;
the other messages go on to trio.

The end (QEMU's END of the RAM stream, and the destination's SHUT): once no page is
dirty the source ends the urgent channel (``UrgentSender.end``: EOF after its last
page; requests read later are counted and answered with nothing, their pages being on
the main channel), then sends the RAM END section and EOF on the main channel, and
waits for SHUT. The destination reads both channels to their ends before it stops
asking for pages and sends SHUT, so neither side ever writes to a channel the other
has closed, and no request in flight can race the closing of the urgent channel.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import numpy as np
import trio

from .. import codec
from .._trio import open_nursery
from ..channel import MigrationChannel, RateLimiter
from ..codec.constants import PING_DEVICES_LOADED, QEMU_VM_PING_PACKAGED_LOADED
from ..errors import LocalProtocolError
from ..postcopy import PageRequest, PageRequestQueue, canonicalize, dirty_ranges
from ..ram_blocks import TARGET_PAGE_SIZE, RamBlock
from ..threads import thread_stream
from ..trace import trace
from ..transports.base import Buffer
from .ram_saver import RamSaver

log = logging.getLogger("trimig.savevm.postcopy")

#: An urgent page the destination does not take within this long breaks the channel.
URGENT_SEND_TIMEOUT = 10.0
#: How often trio retries the urgent writers' lock while the thread writes a page.
_LOCK_POLL = 0.0002


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
            codec.encode_ping(PING_DEVICES_LOADED),
            codec.encode_ping(QEMU_VM_PING_PACKAGED_LOADED),
            codec.encode_postcopy_run(),
        )
    )


@attrs.frozen
class RequestServed:
    """The return-path thread answered ``request`` on the urgent channel with these pages."""

    request: PageRequest
    data_pages: int
    zero_pages: int


class UrgentSender:
    """Sends requested host pages, on the urgent channel when there is one.

    With an urgent channel that has a thread stream (``threaded``) the return-path thread
    sends them with ``send_from_thread``; trio then never writes to that channel. The
    thread only reads the RAM bitmaps: trio clears the dirty bits of what it sent when
    it hears of it (``mark_sent``), so the background sender, which scans and clears
    them in trio, never sees them change under it.

    ``end`` ends the urgent channel once the background stream has sent every page:
    after the last urgent page it half-closes the connection (the destination reads up
    to that EOF before it finishes), and a request answered later sends nothing (its
    page is on the main channel, ahead of that channel's end). So the urgent channel
    is never written once its end is sent, however late a request comes.
    """

    def __init__(self, ram: RamSaver, urgent: MigrationChannel | None) -> None:
        self.ram = ram
        self.urgent = urgent
        self.encoder = codec.RamRecordEncoder()
        self._stream = thread_stream(urgent.stream) if urgent is not None else None
        if self._stream is not None:
            trace("postcopy_thread", loop="urgent sender", stream=type(self._stream).__name__)
        self._thread_bytes = 0
        #: Held by whoever writes the urgent channel (the return-path thread, or trio's
        #: send_now) and by ``end``: an urgent page goes out whole, before the channel's end.
        self._lock = threading.Lock()
        self._ended = False

    @property
    def threaded(self) -> bool:
        """Whether requests are answered by the return-path thread (``send_from_thread``)."""
        return self._stream is not None

    @property
    def bytes_sent(self) -> int:
        """Bytes sent on the urgent channel (by trio or by the thread)."""
        return (self.urgent.bytes_sent if self.urgent is not None else 0) + self._thread_bytes

    def queue_request(
        self, channel: MigrationChannel, request: PageRequest, *, resend: bool = False
    ) -> int:
        """Put the still-dirty target pages of the requested host page on ``channel``;
        with ``resend`` (the urgent channel) all of them: a page already sent may still
        be queued behind megabytes of the main channel, and a second copy is dropped."""
        encoder = self.encoder if channel is self.urgent else self.ram.encoder
        records, data_pages, zero_pages = self._records(request, encoder, resend=resend)
        if records:
            self.mark_sent(request)
        self.ram.stats.normal += data_pages
        self.ram.stats.duplicate += zero_pages
        channel.put_buffers(records)
        return sum(len(record) for record in records)

    def mark_sent(self, request: PageRequest) -> None:
        """In trio: the requested host page went out whole; clear its dirty bits (the
        background sender then skips it) and set its sent bits."""
        block = self.ram.by_name[request.block]
        first = request.start // TARGET_PAGE_SIZE
        count = request.length // TARGET_PAGE_SIZE
        self.ram.dirty[block.name][first : first + count] = False
        self.ram.sent[block.name][first : first + count] = True

    def send_from_thread(self, request: PageRequest) -> RequestServed:
        """From the return-path thread (``threaded`` only): send every target page of the
        requested host page on the urgent channel, blocking until written.
        Neither the statistics nor the bitmaps change here: the caller has trio count the
        pages and ``mark_sent`` them (a bitmap cleared under the background sender's scan
        would corrupt it: numpy's nonzero counts, then fills). Raises TransportError if
        the destination takes nothing for URGENT_SEND_TIMEOUT."""
        if self._stream is None:
            raise RuntimeError("send_from_thread needs an urgent channel with a thread stream")
        with self._lock:
            if self._ended:
                return RequestServed(request, 0, 0)  # its page went on the main channel
            records, data_pages, zero_pages = self._records(request, self.encoder, resend=True)
            if records:
                self._thread_bytes += self._stream.write_all(
                    records, timeout=URGENT_SEND_TIMEOUT, what="the urgent page channel"
                )
        return RequestServed(request, data_pages, zero_pages)

    def _records(
        self, request: PageRequest, encoder: codec.RamRecordEncoder, *, resend: bool = False
    ) -> tuple[list[Buffer], int, int]:
        """The records of the requested host page's still-dirty target pages (all of them
        with ``resend``, which reads no bitmap), with the counts of data and zero pages
        among them. Changes no bitmap (see ``mark_sent``); moves the background scan's
        cursor next to the page (locality; one assignment, safe from the thread)."""
        block = self.ram.by_name[request.block]
        first = request.start // TARGET_PAGE_SIZE
        count = request.length // TARGET_PAGE_SIZE
        if count == 1 and resend:
            return self._one_record(block, first, encoder)
        if resend:
            pages = np.arange(first, first + count)
        else:
            pages = np.flatnonzero(self.ram.dirty[block.name][first : first + count]) + first
            if len(pages) == 0:
                return [], 0, 0  # already sent: it is in flight on the main channel
        rows = block.pages[pages]
        is_zero = rows.view(np.uint64).max(axis=1) == 0
        offsets = pages.astype(np.uint64) * TARGET_PAGE_SIZE
        records: list[Buffer] = []
        zero_pages = int(is_zero.sum())
        if zero_pages:
            records.append(encoder.encode_zero_pages(block.name, offsets[is_zero]))
        if zero_pages < len(pages):
            records += encoder.encode_pages(block.name, offsets[~is_zero], block.mapping.buffer)
        self.ram.move_cursor(block.name, request.start + request.length)
        return records, len(pages) - zero_pages, zero_pages

    def _one_record(
        self, block: RamBlock, page: int, encoder: codec.RamRecordEncoder
    ) -> tuple[list[Buffer], int, int]:
        """``_records`` of one 4 KiB page sent on the urgent channel: one record encoded
        without the array work of the general path, which cost most of its time."""
        offset = page * TARGET_PAGE_SIZE
        self.ram.move_cursor(block.name, offset + TARGET_PAGE_SIZE)
        records: list[Buffer]
        if block.pages[page].view(np.uint64).any():
            records = [*encoder.encode_page(block.name, offset, block.mapping.buffer)]
            return records, 1, 0
        records = [encoder.encode_zero_page(block.name, offset)]
        return records, 0, 1

    async def send_now(self, request: PageRequest) -> None:
        """With an urgent channel: send the requested page at once and flush (nothing once
        the channel has ended)."""
        assert self.urgent is not None
        async with self._locked():
            if not self._ended and self.queue_request(self.urgent, request, resend=True):
                await self.urgent.flush()

    async def end(self) -> None:
        """After the background stream sent every page: end the urgent channel (EOF after
        its last page); later requests are answered with nothing. Waits for an urgent
        page being written to go out first (at most URGENT_SEND_TIMEOUT)."""
        if self.urgent is None or self._ended:
            return
        if self.ram.dirty_pages:
            raise LocalProtocolError("the urgent channel would end while pages are still dirty")
        async with self._locked():
            self._ended = True
        await self.urgent.send_eof()

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the writers' lock from trio. The thread holds it for one write (a few
        microseconds; at most URGENT_SEND_TIMEOUT), so trio polls instead of blocking."""
        while not self._lock.acquire(blocking=False):
            await trio.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            self._lock.release()


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
    hold: trio.Event | None = None,
) -> None:
    """Stream every remaining dirty page in PART sections, requests first, until none is left.

    Until ``hold`` is set only queued requests are answered (the destination is still
    switching over: background pages would compete with it for the CPU).
    """
    while hold is not None and not hold.is_set():
        await _wait_for_either(hold, requests)
        while (request := requests.get_nowait()) is not None:
            channel.put(codec.encode_section_part(section_id))
            urgent.queue_request(channel, request)
            channel.put(codec.encode_ram_section_close(section_id))
            await channel.flush()
    # The rate limit (max-postcopy-bandwidth) as the moment the next background window may
    # go: requests are answered while it is waited for, and do not cut the wait short.
    not_before = time.monotonic()
    while ram.dirty_pages:
        channel.put(codec.encode_section_part(section_id))
        deadline = time.monotonic() + slice_seconds
        queued = 0
        while time.monotonic() < deadline:
            request = requests.get_nowait()
            if request is not None:
                if urgent.queue_request(channel, request):
                    await channel.flush()
                continue
            if time.monotonic() < not_before:
                with trio.move_on_at(min(not_before, deadline)):
                    await requests.wait_pending()
                continue
            window = ram.next_dirty_window()
            if window is None:
                break
            queued += ram.queue_window(channel, *window)
            if queued >= flush_bytes:
                await channel.flush()
                if limiter.rate:
                    not_before = max(not_before, time.monotonic()) + queued / limiter.rate
                queued = 0
        channel.put(codec.encode_ram_section_close(section_id))
        await channel.flush()
        ram.stats.remaining = ram.remaining_bytes


async def _wait_for_either(event: trio.Event, requests: PageRequestQueue) -> None:
    """Return once ``event`` is set or a request is queued."""
    async with open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait_then_cancel, event.wait)
        nursery.start_soon(wait_then_cancel, requests.wait_pending)
