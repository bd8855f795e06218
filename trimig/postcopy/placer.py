"""Atomic placement of received pages into a running guest (destination, postcopy).

From LISTEN on, the guest runs while its RAM arrives: a page must appear whole or
not at all, so pages go in with userfaultfd ioctls (which also wake threads blocked
on them) instead of plain writes. The uffd is the guest's own (sent over
SCM_RIGHTS): its ioctls act on the guest's memory, reading sources from ours.

Records arrive as runs of 4 KiB target pages. For 4 KiB blocks every target page
is a host page and is placed straight from the decoder's buffer (contiguous runs in
one ioctl). For 2 MiB hugetlb blocks the target pages of a host page are gathered
in a per-channel buffer and the host page is placed once all 512 have arrived; the
source sends them back to back on one channel, so a record from another host page
in between is a protocol error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import RemoteProtocolError
from ..kernel.memory import buffer_address, punch_hole
from ..kernel.uffd import Userfaultfd
from .bitmaps import PageBitmap, ReceivedBitmap
from .blocks import TARGET_PAGE_SIZE, GuestRamBlock

PlacedCallback = Callable[[str, npt.NDArray[np.int64]], None]
"""``on_placed(block, host_offsets)``: host pages (byte offsets) that just became present."""

PagePlacedCallback = Callable[[str, int], None]
"""``on_page_placed(block, host_offset)``: one host page that just became present (the
one-page path: an urgent page), told without building an array."""

MAIN_CHANNEL = 0
PREEMPT_CHANNEL = 1
_STAGING_PAGES = 256  # 1 MiB: bounce buffer for runs whose source rows are not adjacent


@attrs.define
class PlacerStats:
    """Counters of one placer, in target pages unless said otherwise."""

    host_pages_placed: int = 0
    """Host pages this placer made present (data or zero)."""
    zero_host_pages: int = 0
    """Of those, host pages placed as zero."""
    skipped_received: int = 0
    """Target pages dropped because they were already marked received."""
    already_present: int = 0
    """Target pages the kernel found already present (EEXIST) and left alone."""


@attrs.define
class _Gather:
    """One channel's buffers: the host page it is assembling (hugetlb blocks) and its
    staging buffer (4 KiB blocks)."""

    block: GuestRamBlock | None = None
    host_offset: int = 0
    filled: npt.NDArray[np.bool_] = attrs.field(factory=lambda: np.zeros(0, dtype=np.bool_))
    zero: npt.NDArray[np.bool_] = attrs.field(factory=lambda: np.zeros(0, dtype=np.bool_))
    buffer: npt.NDArray[np.uint8] | None = None  # (pages_per_host_page, 4096), allocated once
    staging: npt.NDArray[np.uint8] | None = None  # (_STAGING_PAGES, 4096), allocated once


class PagePlacer:
    """Places received pages into one guest's memory through its userfaultfd.

    ``blocks`` are the guest's RAM blocks (guest addresses, engine memfds);
    ``received`` is updated for every page placed (and cleared by ``discard``);
    ``on_placed`` (e.g. ``FaultHandler.pages_placed``) is told of every host page
    whose received bits a call set (placed by it, or found present), after setting
    them, so a request recorded before the bits were set is completed there.
    ``on_page_placed`` (e.g. ``FaultHandler.page_placed``), if given, is told instead of
    ``on_placed`` when a call places one 4 KiB page.
    ``channels`` is the number of postcopy channels (main = 0, preempt = 1), each with
    its own gathering buffer.

    Threads: each channel may be served by its own thread, concurrently with the others
    (the kernel places each page atomically, a page placed twice is skipped, received
    bits are only ever set, and the counters are locked); calls for one channel must not
    overlap. ``discard`` and ``reset_channel`` run while no placement does.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        blocks: Sequence[GuestRamBlock],
        received: ReceivedBitmap,
        *,
        channels: int = 2,
        on_placed: PlacedCallback | None = None,
        on_page_placed: PagePlacedCallback | None = None,
    ) -> None:
        if channels < 1:
            raise ValueError(f"a placer needs at least one channel, got {channels}")
        self._uffd = uffd
        self._blocks = {block.name: block for block in blocks}
        if len(self._blocks) != len(blocks):
            raise ValueError(f"RAM block names must be unique: {[b.name for b in blocks]}")
        for name in self._blocks:
            if name not in received:
                raise ValueError(f"RAM block {name!r} has no received bitmap")
        self._received = received
        self._on_placed = on_placed
        self._on_page_placed = on_page_placed
        self._gathers = [_Gather() for _ in range(channels)]
        self._stats_lock = threading.Lock()
        largest = max((block.page_size for block in blocks), default=TARGET_PAGE_SIZE)
        # Source of hugetlb zero pages (no UFFDIO_ZEROPAGE there); calloc'd, never written.
        self._zero_buffer = np.zeros(largest, dtype=np.uint8)
        self.stats = PlacerStats()

    @property
    def channels(self) -> int:
        return len(self._gathers)

    # ------------------------------------------------------------------ API

    def place(
        self,
        block: str,
        offsets: npt.ArrayLike,
        pages: npt.NDArray[np.uint8],
        *,
        channel: int = MAIN_CHANNEL,
    ) -> int:
        """Place a run of target pages: ``pages[i]`` (4096 bytes) goes to byte
        ``offsets[i]`` of ``block``. ``pages`` may be a view that is only valid during
        the call; nothing keeps a reference to it.

        Returns the number of host pages that became present. Raises
        RemoteProtocolError for an unknown block, a bad offset, or (hugetlb) a record
        of another host page while one is half gathered on this channel.
        """
        target, index = self._check(block, offsets, channel)
        if pages.ndim != 2 or pages.shape != (index.shape[0], TARGET_PAGE_SIZE):
            raise ValueError(
                f"pages must have shape ({index.shape[0]}, {TARGET_PAGE_SIZE}), got {pages.shape}"
            )
        if pages.dtype != np.uint8:
            raise ValueError(f"pages must be uint8, got {pages.dtype}")
        if target.page_size == TARGET_PAGE_SIZE:
            if index.shape[0] == 1 and pages.strides[1] == 1:
                return self._place_one(target, int(index[0]), pages[0])
            return self._place_small(target, index, pages, self._gather_state(channel))
        return self._gather(target, index, pages, channel)

    def place_page(
        self,
        block: str,
        offset: int,
        page: npt.NDArray[np.uint8] | None,
        *,
        channel: int = MAIN_CHANNEL,
    ) -> int:
        """``place`` (``page`` None: ``place_zero``) of one target page at byte ``offset``
        of ``block``, ``page`` being 4096 contiguous bytes: an urgent page, placed without
        the array work of a run. Same result and errors."""
        target = self._blocks.get(block)
        if (
            target is None
            or target.page_size != TARGET_PAGE_SIZE
            or not 0 <= channel < len(self._gathers)
            or (page is not None and (page.shape != (TARGET_PAGE_SIZE,) or page.strides != (1,)))
        ):  # errors and hugetlb blocks: the general path
            offsets = np.array([offset], dtype=np.uint64)
            if page is None:
                return self.place_zero(block, offsets, channel=channel)
            return self.place(block, offsets, page.reshape(1, -1), channel=channel)
        if offset % TARGET_PAGE_SIZE or not 0 <= offset < target.size:
            raise self._illegal(offset, target)
        return self._place_one(target, offset // TARGET_PAGE_SIZE, page)

    def place_zero(self, block: str, offsets: npt.ArrayLike, *, channel: int = MAIN_CHANNEL) -> int:
        """Place zero target pages at byte ``offsets`` of ``block``; like ``place``."""
        target, index = self._check(block, offsets, channel)
        if target.page_size == TARGET_PAGE_SIZE:
            if index.shape[0] == 1:
                return self._place_one(target, int(index[0]), None)
            return self._place_small(target, index, None, self._gather_state(channel))
        return self._gather(target, index, None, channel)

    def discard(self, block: str, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD range: free ``[start, start+length)`` of the block's memfd
        (so a later guest access faults) and clear its received bits.

        Raises RemoteProtocolError if the range is not aligned to the block's page size
        or leaves the block.
        """
        target = self._block(block)
        if start < 0 or length <= 0 or start % target.page_size or length % target.page_size:
            raise RemoteProtocolError(
                f"discard of RAM block {block!r} (start {start:#x}, length {length:#x}) is not "
                f"aligned to the block's page size {target.page_size:#x}"
            )
        if start + length > target.size:
            raise RemoteProtocolError(
                f"discard of RAM block {block!r} (start {start:#x}, length {length:#x}) runs "
                f"past the block's end {target.size:#x}"
            )
        punch_hole(target.memfd, start, length)
        self._received.clear(block, start, length)

    def reset_channel(self, channel: int) -> None:
        """Drop the host page half gathered on ``channel`` (postcopy pause); its pieces
        were never marked received, so the source sends them again."""
        self._gather_state(channel).block = None

    def gathering(self, channel: int) -> tuple[str, int] | None:
        """``(block, host_offset)`` of the host page half gathered on ``channel``, if any."""
        state = self._gather_state(channel)
        if state.block is None:
            return None
        return state.block.name, state.host_offset

    # ------------------------------------------------------- 4 KiB host pages

    def _place_one(self, block: GuestRamBlock, page: int, row: npt.NDArray[np.uint8] | None) -> int:
        """Place one 4 KiB target page (an urgent page, a fault on a known zero): the
        general path costs tens of microseconds of numpy calls on one-element arrays."""
        bitmap = self._received.block(block.name)
        if bitmap.test(page):
            self._count(skipped_received=1)
            return 0
        address = block.address + page * TARGET_PAGE_SIZE
        if row is None:
            done = self._uffd.zeropage(address, TARGET_PAGE_SIZE)
        else:
            done = self._uffd.copy(address, row.ctypes.data, TARGET_PAGE_SIZE)
        self._account(bitmap, page, 1, done, zero=row is None)
        # Received now, placed here or already present.
        if self._on_page_placed is not None:
            self._on_page_placed(block.name, page * TARGET_PAGE_SIZE)
        elif self._on_placed is not None:
            self._on_placed(block.name, np.array([page * TARGET_PAGE_SIZE], dtype=np.int64))
        return done // TARGET_PAGE_SIZE

    def _place_small(
        self,
        block: GuestRamBlock,
        index: npt.NDArray[np.int64],
        pages: npt.NDArray[np.uint8] | None,
        state: _Gather,
    ) -> int:
        """Place target pages that are whole host pages, in runs of adjacent pages."""
        bitmap = self._received.block(block.name)
        todo = ~bitmap.test_pages(index)
        skipped = int(index.shape[0] - np.count_nonzero(todo))
        if skipped:
            self._count(skipped_received=skipped)
        if not todo.any():
            return 0
        # Runs: adjacent destination pages with the same "to do" status.
        breaks = np.ones(index.shape[0], dtype=np.bool_)
        breaks[1:] = (np.diff(index) != 1) | (todo[1:] != todo[:-1])
        starts = np.flatnonzero(breaks)
        ends = np.append(starts[1:], index.shape[0])
        placed = 0
        try:
            for first, end in zip(starts.tolist(), ends.tolist(), strict=True):
                if todo[first]:
                    placed += self._place_run(
                        block, bitmap, int(index[first]), pages, first, end, state
                    )
        finally:
            if self._on_placed is not None:  # the pages of todo marked received so far
                done = index[todo]
                present = bitmap.test_pages(done)
                self._on_placed(block.name, done[present] * TARGET_PAGE_SIZE)
        return placed

    def _place_run(
        self,
        block: GuestRamBlock,
        bitmap: PageBitmap,
        first_page: int,
        pages: npt.NDArray[np.uint8] | None,
        first: int,
        end: int,
        state: _Gather,
    ) -> int:
        """Place rows ``[first, end)`` at adjacent pages from ``first_page`` on."""
        count = end - first
        if pages is None:
            done = self._uffd.zeropage(
                block.address + first_page * TARGET_PAGE_SIZE, count * TARGET_PAGE_SIZE
            )
            self._account(bitmap, first_page, count, done, zero=True)
            return done // TARGET_PAGE_SIZE
        rows = pages[first:end]
        if rows.strides == (TARGET_PAGE_SIZE, 1) or count == 1:
            done = self._copy_rows(block, first_page, rows)
            self._account(bitmap, first_page, count, done)
            return done // TARGET_PAGE_SIZE
        # Rows not adjacent in the source (e.g. record headers between them): bounce
        # through a staging buffer so the run still takes one ioctl per chunk.
        if state.staging is None:
            state.staging = np.empty((_STAGING_PAGES, TARGET_PAGE_SIZE), dtype=np.uint8)
        staging = state.staging
        total = 0
        for chunk in range(0, count, _STAGING_PAGES):
            size = min(_STAGING_PAGES, count - chunk)
            staging[:size] = rows[chunk : chunk + size]
            done = self._copy_rows(block, first_page + chunk, staging[:size])
            self._account(bitmap, first_page + chunk, size, done)
            total += done // TARGET_PAGE_SIZE
        return total

    def _copy_rows(self, block: GuestRamBlock, first_page: int, rows: npt.NDArray[np.uint8]) -> int:
        """One UFFDIO_COPY of adjacent rows; present pages are skipped by the kernel binding."""
        source = rows.__array_interface__["data"][0]
        return self._uffd.copy(
            block.address + first_page * TARGET_PAGE_SIZE, source, rows.shape[0] * TARGET_PAGE_SIZE
        )

    def _account(
        self, bitmap: PageBitmap, first_page: int, count: int, done: int, *, zero: bool = False
    ) -> None:
        """After a successful ioctl every page of the range is present: placed by it
        (``done`` bytes) or already there (EEXIST)."""
        bitmap.set_range(first_page, count)
        placed = done // TARGET_PAGE_SIZE
        with self._stats_lock:  # not _count: this runs once per placed run or urgent page
            stats = self.stats
            stats.host_pages_placed += placed
            stats.already_present += count - placed
            if zero:
                stats.zero_host_pages += placed

    def _count(self, **increments: int) -> None:
        """Add to the counters (channels may run in different threads)."""
        with self._stats_lock:
            for name, increment in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + increment)

    # ------------------------------------------------------ huge host pages

    def _gather(
        self,
        block: GuestRamBlock,
        index: npt.NDArray[np.int64],
        pages: npt.NDArray[np.uint8] | None,
        channel: int,
    ) -> int:
        """Collect target pages into the channel's host page; place each completed one."""
        per_host = block.page_size // TARGET_PAGE_SIZE
        state = self._gather_state(channel)
        host = index // per_host
        # Groups of consecutive records in the same host page.
        breaks = np.ones(index.shape[0], dtype=np.bool_)
        breaks[1:] = host[1:] != host[:-1]
        starts = np.flatnonzero(breaks)
        ends = np.append(starts[1:], index.shape[0])
        placed = 0
        for first, end in zip(starts.tolist(), ends.tolist(), strict=True):
            host_offset = int(host[first]) * block.page_size
            if state.block is None:
                self._start_gather(state, block, host_offset, per_host)
            elif state.block is not block or state.host_offset != host_offset:
                raise RemoteProtocolError(
                    f"Non-same host page detected on channel {channel}: gathering RAM block "
                    f"{state.block.name!r} host page {state.host_offset:#x} "
                    f"({int(np.count_nonzero(state.filled))} of {per_host} target pages), "
                    f"received RAM block {block.name!r} offset "
                    f"{int(index[first]) * TARGET_PAGE_SIZE:#x}"
                )
            assert state.buffer is not None
            slots = index[first:end] - host[first] * per_host
            if pages is None:
                state.zero[slots] = True
            else:
                state.buffer[slots] = pages[first:end]
                state.zero[slots] = False
            state.filled[slots] = True
            if state.filled.all():
                placed += self._place_gathered(state, block)
                state.block = None
        return placed

    def _start_gather(
        self, state: _Gather, block: GuestRamBlock, host_offset: int, per_host: int
    ) -> None:
        if state.buffer is None or state.buffer.shape[0] != per_host:
            state.buffer = np.empty((per_host, TARGET_PAGE_SIZE), dtype=np.uint8)
            state.filled = np.zeros(per_host, dtype=np.bool_)
            state.zero = np.zeros(per_host, dtype=np.bool_)
        state.block = block
        state.host_offset = host_offset
        state.filled[:] = False

    def _place_gathered(self, state: _Gather, block: GuestRamBlock) -> int:
        """Place a completed host page with one UFFDIO_COPY (from the zero buffer if
        every piece was zero). Returns 1 if it became present, else 0."""
        assert state.buffer is not None
        per_host = state.buffer.shape[0]
        first_page = state.host_offset // TARGET_PAGE_SIZE
        bitmap = self._received.block(block.name)
        if bitmap.all_set(first_page, per_host):
            self._count(skipped_received=per_host)
            return 0
        if state.zero.all():
            source = self._zero_buffer.__array_interface__["data"][0]
        else:
            state.buffer[state.zero] = 0
            source = buffer_address(state.buffer)
        done = self._uffd.copy(
            block.address + state.host_offset, source, block.page_size, page_size=block.page_size
        )
        bitmap.set_range(first_page, per_host)
        if done:
            self._count(host_pages_placed=1, zero_host_pages=int(state.zero.all()))
        else:
            self._count(already_present=per_host)
        if self._on_placed is not None:
            self._on_placed(block.name, np.array([state.host_offset], dtype=np.int64))
        return 1 if done else 0

    # ------------------------------------------------------------- helpers

    def _block(self, name: str) -> GuestRamBlock:
        try:
            return self._blocks[name]
        except KeyError:
            raise RemoteProtocolError(f"page for unknown RAM block {name!r}") from None

    def _gather_state(self, channel: int) -> _Gather:
        if not 0 <= channel < len(self._gathers):
            raise ValueError(f"channel {channel} out of range (placer has {len(self._gathers)})")
        return self._gathers[channel]

    def _check(
        self, name: str, offsets: npt.ArrayLike, channel: int
    ) -> tuple[GuestRamBlock, npt.NDArray[np.int64]]:
        """Resolve the block and turn byte offsets into target page indices."""
        self._gather_state(channel)
        block = self._block(name)
        raw = np.asarray(offsets)
        if raw.ndim != 1:
            raise ValueError(f"offsets must be 1-D, got shape {raw.shape}")
        offsets_array = raw.astype(np.int64, copy=False)
        if offsets_array.size == 1:  # an urgent page: plain integers are much cheaper
            offset = int(offsets_array[0])
            if offset % TARGET_PAGE_SIZE or not 0 <= offset < block.size:
                raise self._illegal(int(raw[0]), block)
        elif offsets_array.size:
            bad = (
                (offsets_array % TARGET_PAGE_SIZE != 0)
                | (offsets_array < 0)
                | (offsets_array >= block.size)
            )
            if bad.any():
                raise self._illegal(int(raw[np.flatnonzero(bad)[0]]), block)
        return block, offsets_array // TARGET_PAGE_SIZE

    @staticmethod
    def _illegal(offset: int, block: GuestRamBlock) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"Illegal RAM offset {offset:#x} for RAM block {block.name!r} of size {block.size:#x}"
        )
