"""The source's RAM state: the dirty bitmap, the kernel dirty log and the page sender.

The dirty log is the guest's own mappings, registered by the guest in userfaultfd
WP mode with WP_ASYNC: the kernel write-protects every page, a guest write
unprotects it without a fault message, and PAGEMAP_SCAN with WP matching returns
the written pages and protects them again in one atomic call. Finding dirty pages
therefore never reads RAM.

Pages go out in windows of one 2 MiB host page (512 target pages). A window's dirty
pages are read from the block's memfd with pread into a staging buffer, never through a
mapping: a read through a mapping of a page the guest has just punched out
(``fallocate(PUNCH_HOLE)``) allocates it again, so the hole the next sync looks for is
gone, and a punch in the middle of the kernel's copy tears the page (old data, then
zeros) with nothing left to say it changed. pread allocates nothing and copies each page
from one page-cache page. The codec then builds a gather array whose page entries point
into the staging buffer (an IoVector): no Python object per page, and the zero check
reads the very bytes that go out.

Discards are found by a :class:`~trimig.kernel.witness.DiscardWitness` per block: each
data page is *watched* (mapped into the engine's untouched witness mapping) before it is
read, and a punch unmaps it there for good, so a sync finds every page discarded after
it was read, even one the guest has read back in since (a fresh zero page, still
write-protected: no write in the log, no hole in the file).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence

import numpy as np

from .. import codec
from ..channel import MigrationChannel, RateLimiter
from ..codec import RamRecordEncoder
from ..codec.constants import TARGET_PAGE_SIZE
from ..errors import KernelError, TransportError
from ..kernel.iov import IoVector, read_at
from ..kernel.pagemap import PagemapScanner, merge_adjacent
from ..kernel.uffd import Userfaultfd
from ..kernel.witness import DiscardWitness
from ..migration import SourceStats
from ..ram_blocks import RamBlock
from ..transports.base import RegionRegistry
from .mapped_ram import MappedRamWriter

#: Target pages per send window: one 2 MiB host page, so a hugetlb host page is never
#: split across windows, and 2 x 512 iovecs fit one writev.
WINDOW_PAGES = 512
WINDOW_BYTES = WINDOW_PAGES * TARGET_PAGE_SIZE
#: zero_pages samples the first line of every this many pages of a run to guess a zero run.
_ZERO_SAMPLE_STRIDE = 64
#: The staging "buffer" of a window with nothing to read (no data page comes from it).
_NO_PAGES = np.empty((0, TARGET_PAGE_SIZE), dtype=np.uint8)
#: The hole map asks SEEK_DATA only about the gaps between the pages the guest has mapped
#: present; past this many gaps one SEEK walk over the whole memfd is cheaper.
_MAX_SEEK_GAPS = 64
#: collect_last walks only the stretches of needed pages when they cover at most this share.
_PARTIAL_WALK_SHARE = 0.5


def ranges_to_pages(ranges: np.ndarray, base: int, npages: int) -> np.ndarray:
    """Turn (n, 2) [start, end) address ranges into the sorted target-page indices they cover."""
    if len(ranges) == 0:
        return np.empty(0, dtype=np.int64)
    starts = (ranges[:, 0].astype(np.int64) - base) // TARGET_PAGE_SIZE
    ends = (ranges[:, 1].astype(np.int64) - base + TARGET_PAGE_SIZE - 1) // TARGET_PAGE_SIZE
    starts = np.clip(starts, 0, npages)
    ends = np.clip(ends, 0, npages)
    lengths = ends - starts
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    total = int(lengths.sum())
    run_first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - run_first)


class DirtyLog:
    """The kernel dirty log of one guest: PAGEMAP_SCAN over its WP-async mappings."""

    def __init__(
        self,
        guest_pid: int,
        blocks: Sequence[RamBlock],
        addresses: Sequence[int],
        uffd: Userfaultfd,
    ) -> None:
        self._uffd = uffd
        self._scanner = PagemapScanner(guest_pid)
        self._blocks = list(zip(blocks, addresses, strict=True))
        self._addresses = {block.name: address for block, address in self._blocks}

    def collect(self, dirty: dict[str, np.ndarray]) -> int:
        """OR the pages written since the last call into ``dirty``; return how many were new."""
        newly = 0
        for block, address in self._blocks:
            ranges = self._scanner.take_written(address, address + block.size)
            newly += self._mark(dirty, block, ranges)
        return newly

    def collect_last(
        self, dirty: dict[str, np.ndarray], needed: dict[str, np.ndarray] | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        """``collect`` for the last time (the guest is stopped for good), with each block's
        present ranges for ``hole_pages``, from one read-only walk (nothing is protected
        again). ``needed`` (per block, a bool per page): where the log or presence matters;
        if that is little (a switch right after the start), the 2 MiB stretches without
        one are skipped and returned as present: data to ``hole_pages``, the safe side."""
        newly = 0
        present: dict[str, np.ndarray] = {}
        for block, address in self._blocks:
            pages = block.spec.target_pages
            walk, skip = _walk_plan(None if needed is None else needed[block.name], pages)
            found: list[np.ndarray] = []
            for first, end in walk:
                written, here = self._scanner.written_and_present(
                    address + first * TARGET_PAGE_SIZE, address + end * TARGET_PAGE_SIZE
                )
                newly += self._mark(dirty, block, written)
                found.append(here)
            skipped = np.array(skip, dtype=np.uint64).reshape(-1, 2)
            found.append(skipped * np.uint64(TARGET_PAGE_SIZE) + np.uint64(address))
            ranges = np.concatenate(found)
            present[block.name] = merge_adjacent(ranges[np.argsort(ranges[:, 0])])
        return newly, present

    def _mark(self, dirty: dict[str, np.ndarray], block: RamBlock, ranges: np.ndarray) -> int:
        pages = ranges_to_pages(ranges, self._addresses[block.name], block.spec.target_pages)
        bitmap = dirty[block.name]
        newly = int(len(pages) - np.count_nonzero(bitmap[pages]))
        bitmap[pages] = True
        return newly

    def hole_pages(self, block: RamBlock, present: np.ndarray | None = None) -> np.ndarray:
        """One bool per target page of a shmem ``block``: a hole in its memfd, read now
        (``present``: the block's present ranges from ``collect_last``, read then).

        A page the guest maps present is in the memfd's page cache, so data: one
        PAGEMAP_SCAN finds those, and SEEK_DATA/SEEK_HOLE (which count a swapped-out
        shmem page as data) decide only the pages between them. A page can only be
        called a hole by SEEK, as before; the scan saves the walk over every allocated
        page (15-20 ms per GiB).
        """
        address = self._addresses[block.name]
        if present is None:
            present = self._scanner.present(address, address + block.size)
        pages = (present.astype(np.int64) - address) // TARGET_PAGE_SIZE
        return seek_hole_pages(block, pages)

    def close(self) -> None:
        """Stop reading the log; the guest unregisters its side with ``untrack_dirty``."""
        self._scanner.close()
        self._uffd.close()


class RamSaver:
    """Tracks which pages still have to go and sends them as RAM records on a channel."""

    def __init__(self, blocks: Sequence[RamBlock], stats: SourceStats) -> None:
        self.blocks = list(blocks)
        self.by_name = {block.name: block for block in self.blocks}
        self.stats = stats
        #: One bool per target page: True = the destination's copy is stale.
        self.dirty = {b.name: np.ones(b.spec.target_pages, dtype=bool) for b in self.blocks}
        #: One bool per target page: sent at least once (for the debug dump).
        self.sent = {b.name: np.zeros(b.spec.target_pages, dtype=bool) for b in self.blocks}
        #: One bool per target page: the last record we sent for it carried data (so the
        #: destination's copy is not zero; a discard here must reach it).
        self.holds_data = {b.name: np.zeros(b.spec.target_pages, dtype=bool) for b in self.blocks}
        #: Per shmem block, the pages that were holes in the memfd at the last ``sync``:
        #: sent as ZERO without being read. Empty until the first sync.
        self._holes: dict[str, np.ndarray] = {}
        self._cursor = (0, 0)  # (block index, window index)
        self.encoder = RamRecordEncoder()
        #: Per block, the destination's memory as (pages, TARGET_PAGE_SIZE) rows, when data
        #: pages are written one-sided (RDMA-shaped transport, see attach_regions).
        self._remote: dict[str, np.ndarray] = {}
        #: Page bytes written one-sided into the destination or into a mapped-ram file's
        #: page slots (not on any channel).
        self.one_sided_bytes = 0
        #: With mapped-ram, the writer that puts data pages into their file slots
        #: (queue_window then queues no records at all).
        self.file_pages: MappedRamWriter | None = None
        self._staging = StagingBuffers()
        #: Per block, the witness of its discards (made at the first sync) and the pages
        #: watched in it. Gone after the final sync: the guest no longer runs.
        self._witnesses: dict[str, DiscardWitness] = {}
        self._final_sync_done = False
        self._watched = {b.name: np.zeros(b.spec.target_pages, dtype=bool) for b in self.blocks}

    async def attach_regions(self, regions: RegionRegistry) -> None:
        """From now on write data pages one-sided into the destination's blocks.

        For the RDMA-shaped transport (``channel.stream.regions``): call it once MEM_SIZE
        has been flushed, since the destination registers its blocks when it reads
        MEM_SIZE; this waits for each registration. queue_window then copies data pages
        straight into the destination's memory and queues HOOK records ("npages written
        from offset") instead of PAGE records; zero pages stay ZERO records. Raises
        TransportError if the destination goes away or offers a region of the wrong size.
        """
        remote: dict[str, np.ndarray] = {}
        for block in self.blocks:
            view = await regions.remote(block.name)
            if view.nbytes != block.size:
                raise TransportError(
                    f"the destination registered RAM block {block.name!r} with {view.nbytes} "
                    f"bytes, but it has {block.size}"
                )
            rows = np.frombuffer(view, dtype=np.uint8).reshape(-1, TARGET_PAGE_SIZE)
            remote[block.name] = rows
        self._remote = remote

    @property
    def writes_one_sided(self) -> bool:
        """Whether data pages go one-sided into the destination's regions."""
        return bool(self._remote)

    def detach_regions(self) -> None:
        """Send data pages as PAGE records again (e.g. from the switch to postcopy on)."""
        self._remote = {}

    @property
    def dirty_pages(self) -> int:
        return sum(int(np.count_nonzero(bitmap)) for bitmap in self.dirty.values())

    @property
    def remaining_bytes(self) -> int:
        return self.dirty_pages * TARGET_PAGE_SIZE

    def move_cursor(self, block_name: str, offset: int) -> None:
        """Continue the background scan from the window holding ``offset`` (postcopy locality)."""
        index = next(i for i, b in enumerate(self.blocks) if b.name == block_name)
        self._cursor = (index, offset // WINDOW_BYTES)

    def next_dirty_window(self) -> tuple[RamBlock, int] | None:
        """The next window (block, first page) with a dirty page, from the cursor, wrapping.

        Looks only as far as the first dirty page (argmax stops at the first True).
        """
        start_block, start_window = self._cursor
        nblocks = len(self.blocks)
        for step in range(nblocks + 1):
            index = (start_block + step) % nblocks
            block = self.blocks[index]
            first = start_window * WINDOW_PAGES if step == 0 else 0
            rest = self.dirty[block.name][first:]
            if len(rest) == 0:
                continue
            page = int(np.argmax(rest))
            if rest[page]:
                window = (first + page) // WINDOW_PAGES
                self._cursor = (index, window)
                return block, window * WINDOW_PAGES
        return None

    def queue_window(self, channel: MigrationChannel, block: RamBlock, first_page: int) -> int:
        """Queue the dirty pages of one window on ``channel`` and clear their bits.

        Returns the number of bytes queued (with attached regions: the HOOK records plus
        the page bytes written one-sided, so that flush thresholds and the rate limit
        still count the data moved).
        """
        end_page = min(first_page + WINDOW_PAGES, block.spec.target_pages)
        dirty = self.dirty[block.name][first_page:end_page]
        pages = np.flatnonzero(dirty) + first_page
        if len(pages) == 0:
            return 0
        dirty[:] = False
        self.sent[block.name][pages] = True
        holes = self._holes.get(block.name)
        is_zero = holes[pages] if holes is not None else np.zeros(len(pages), dtype=bool)
        present = pages[~is_zero]
        # Where the pages are read from: row 0 of ``staging`` is page ``staging_first``.
        staging, staging_first = _NO_PAGES, first_page
        if len(present) and self._sends_from_mapping:
            staging, staging_first = block.pages, 0
            is_zero[~is_zero] = zero_pages(block.pages, present)
        elif len(present):
            # A buffer only for a window with pages to read: one of holes queues a few
            # bytes of ZERO records, and many of them go out between two flushes.
            staging, staging_first = self._staging.take(channel), first_page
            witness = self._witnesses.get(block.name)
            if witness is not None and not self._final_sync_done:
                self._watch(witness, block, present)
            _read_pages(block, first_page, present, staging)
            is_zero[~is_zero] = zero_pages(staging, present - first_page)
        self.holds_data[block.name][pages] = ~is_zero
        if self.file_pages is not None:
            written = self.file_pages.write_window(block, pages, is_zero, staging, first_page)
            self.one_sided_bytes += written
            self.stats.duplicate += int(np.count_nonzero(is_zero))
            self.stats.normal += written // TARGET_PAGE_SIZE
            return written
        offsets = pages.astype(np.uint64) * TARGET_PAGE_SIZE
        zero_offsets = offsets[is_zero]
        data_offsets = offsets[~is_zero]
        queued = 0
        if len(zero_offsets):
            record = self.encoder.encode_zero_pages(block.name, zero_offsets)
            channel.put(record)
            queued += len(record)
            self.stats.duplicate += len(zero_offsets)
        if len(data_offsets):
            remote = self._remote.get(block.name)
            if remote is not None:
                queued += self._write_remote(
                    channel, block, remote, pages[~is_zero], staging, first_page
                )
            else:
                headers, entries = self.encoder.encode_pages_gather(
                    block.name, data_offsets, staging, staging_first * TARGET_PAGE_SIZE
                )
                vector = IoVector(entries, (headers, staging))
                channel.put_vector(vector)
                queued += vector.nbytes
            self.stats.normal += len(data_offsets)
        return queued

    @property
    def _sends_from_mapping(self) -> bool:
        """After the final sync the guest is stopped for good (a postcopy source, the end
        of precopy): no write and no discard can tear a page while the kernel copies it
        out, so PAGE records point straight into the block's mapping, as urgent pages
        do, instead of into a pread copy (docs/correctness.md, "a page torn by a
        discard"). Not for one-sided or mapped-ram writes, which read staging rows."""
        return self._final_sync_done and self.file_pages is None and not self._remote

    def _write_remote(
        self,
        channel: MigrationChannel,
        block: RamBlock,
        remote: np.ndarray,
        pages: np.ndarray,
        staging: np.ndarray,
        staging_first: int,
    ) -> int:
        """Copy ``pages`` (read into ``staging``, whose row 0 is page ``staging_first``)
        into the destination's memory, one HOOK record per run of consecutive pages;
        return the bytes moved (records and pages, for pacing)."""
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        moved = 0
        for run in np.split(pages, breaks):
            first, count = int(run[0]), len(run)
            row = first - staging_first
            remote[first : first + count] = staging[row : row + count]
            record = self.encoder.encode_written(block.name, first * TARGET_PAGE_SIZE, count)
            channel.put(record)
            moved += len(record) + count * TARGET_PAGE_SIZE
            self.one_sided_bytes += count * TARGET_PAGE_SIZE
        return moved

    def sync(self, dirty_log: DirtyLog, *, final: bool = False) -> int:
        """Bring the dirty bitmap up to date; return how many pages became dirty.

        Takes the pages written since the last sync from the kernel log (which protects
        them again), *then* reads which pages are holes in each memfd. That order is what
        makes the hole map safe to send ZERO from without reading the page: a page that
        is a hole when the map is read and is written afterwards is in the next sync's
        log. Pages the guest discarded (``fallocate(PUNCH_HOLE)``, which the write log
        does not see) after we read their data become dirty here, so they go again: the
        witness no longer maps them (whether they are still holes or the guest has read
        a fresh zero page in since); a page discarded after this call is found by the
        next one. Call it before any page goes (to start the log afresh and the
        witnesses), and with ``final`` once the guest is stopped for good: that sync is
        exact, and nothing is watched after it. (Nothing changes then, so the final sync
        reads the log and the present pages in one scan, ``DirtyLog.collect_last``.)
        """
        if self._final_sync_done:
            raise RuntimeError("RamSaver.sync after the final sync")
        if not self._witnesses and not final:
            self._start_witnesses()
        if final:  # the guest is stopped: the log and the present pages in one scan,
            # where they matter: a page not dirty (the log), or sent as data (a hole now)
            needed = {b.name: ~self.dirty[b.name] | self.holds_data[b.name] for b in self.blocks}
            newly, present = dirty_log.collect_last(self.dirty, needed)
        else:
            newly, present = dirty_log.collect(self.dirty), {}
        for block in self.blocks:
            dirty = self.dirty[block.name]
            gone = self.holds_data[block.name] & self._discarded(block)
            if not block.spec.hugetlb:  # hugetlbfs has no SEEK_HOLE; its pages are read
                holes = dirty_log.hole_pages(block, present.get(block.name))
                self._holes[block.name] = holes
                gone |= self.holds_data[block.name] & holes
            if gone.any():
                newly += int(np.count_nonzero(gone & ~dirty))
                dirty |= gone
        # After the final sync nothing is watched; the witnesses are closed by close(),
        # not here: unmapping a GiB of watched pages takes tens of ms, and this is the
        # guest's downtime (the postcopy switch's pause).
        self._final_sync_done = final
        return newly

    def refresh_holes(self, dirty_log: DirtyLog) -> None:
        """After the final sync, once nothing changes (a postcopy source): the whole hole
        map again, also where that sync skipped stretches (so their holes go ZERO unread)."""
        if not self._final_sync_done:
            raise RuntimeError("RamSaver.refresh_holes before the final sync")
        for block in self.blocks:
            if not block.spec.hugetlb:
                self._holes[block.name] = dirty_log.hole_pages(block)

    def _start_witnesses(self) -> None:
        try:
            for block in self.blocks:
                self._witnesses[block.name] = DiscardWitness(
                    block.fd, block.size, block.page_size, hugetlb=block.spec.hugetlb
                )
        except BaseException:
            self.close()
            raise

    def _watch(self, witness: DiscardWitness, block: RamBlock, pages: np.ndarray) -> None:
        """Watch the host pages holding ``pages`` (sorted target pages about to be read)
        that are not watched yet, one call per run of them."""
        watched = self._watched[block.name]
        pages = pages[~watched[pages]]
        if len(pages) == 0:
            return
        per_host = block.page_size // TARGET_PAGE_SIZE
        if per_host > 1:
            first = pages[0] // per_host * per_host  # a window is one huge page
            pages = np.arange(first, first + per_host)
        watched[pages] = True
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = np.concatenate(([pages[0]], pages[breaks])).tolist()
        ends = (np.concatenate((pages[breaks - 1], [pages[-1]])) + 1).tolist()
        for start, end in zip(starts, ends, strict=True):
            witness.watch(start * TARGET_PAGE_SIZE, (end - start) * TARGET_PAGE_SIZE)

    def _discarded(self, block: RamBlock) -> np.ndarray:
        """One bool per target page: watched, and unmapped from the witness since (so
        no longer watched)."""
        watched = self._watched[block.name]
        witness = self._witnesses.get(block.name)
        if witness is None:
            return np.zeros(len(watched), dtype=bool)
        still = np.zeros(len(watched), dtype=bool)
        for start, end in (witness.watched() // TARGET_PAGE_SIZE).tolist():
            still[start:end] = True
        discarded = watched & ~still
        watched &= still
        return discarded

    def close(self) -> None:
        """Stop watching for discards (the staging buffers go with the object)."""
        for witness in self._witnesses.values():
            witness.close()
        self._witnesses.clear()


class StagingBuffers:
    """Window-sized buffers that pages are read into before they are sent.

    A buffer handed out by :meth:`take` is queued on a channel with put_vector(), so it
    is free again only once that channel has written the flush that carries it; until
    then ``take`` hands out another (made when none is free: as many exist as windows are
    queued between two flushes)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        #: (buffer, channel, the flush of that channel that writes it)
        self._queued: list[tuple[np.ndarray, MigrationChannel, int]] = []

    def take(self, channel: MigrationChannel) -> np.ndarray:
        """A (WINDOW_PAGES, TARGET_PAGE_SIZE) uint8 buffer to be queued on ``channel``."""
        if self._queued:
            still = []
            for entry in self._queued:
                buffer, owner, flush = entry
                if owner.written_flushes >= flush:
                    self._free.append(buffer)
                else:
                    still.append(entry)
            self._queued = still
        buffer = (
            self._free.pop()
            if self._free
            else np.zeros((WINDOW_PAGES, TARGET_PAGE_SIZE), dtype=np.uint8)
        )
        self._queued.append((buffer, channel, channel.next_flush))
        return buffer


#: Dirty pages this close together are read with one pread (the pages between come along).
_READ_GAP_PAGES = 16


def _read_pages(block: RamBlock, first_page: int, pages: np.ndarray, staging: np.ndarray) -> None:
    """pread ``pages`` (sorted, within the window that starts at ``first_page``) of
    ``block`` into their rows of ``staging``: one read per run of pages no more than
    _READ_GAP_PAGES apart."""
    breaks = np.flatnonzero(np.diff(pages) > _READ_GAP_PAGES) + 1
    starts = np.concatenate(([pages[0]], pages[breaks])).tolist()
    ends = (np.concatenate((pages[breaks - 1], [pages[-1]])) + 1).tolist()
    for start, end in zip(starts, ends, strict=True):
        rows = staging[start - first_page : end - first_page]
        wanted = rows.nbytes
        if read_at(block.fd, rows.reshape(-1).data, start * TARGET_PAGE_SIZE) != wanted:
            raise KernelError(
                "preadv", errno.EIO, f"RAM block {block.name!r} ends before page {end - 1}"
            )


def zero_pages(pages: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Which of the pages ``index`` (sorted) of ``pages`` ((n, TARGET_PAGE_SIZE) uint8) are
    all zero, as a bool array.

    Reads the first 64 bytes of each page, and the whole page only where those are zero,
    so a window of data pages costs one cache line per page. A run of consecutive pages
    whose sampled first lines are all zero is read whole first, in one sequential pass: a
    zero window then costs that pass alone. A run is read as a view, never copied.
    """
    if len(index) == 0:
        return np.zeros(0, dtype=bool)
    words = pages.view(np.uint64)
    first = int(index[0])
    rows = None
    if int(index[-1]) - first == len(index) - 1:
        rows = words[first : first + len(index)]
        if not rows[::_ZERO_SAMPLE_STRIDE, :8].any() and not np.count_nonzero(rows):
            return np.ones(len(index), dtype=bool)
    heads = rows[:, :8] if rows is not None else words[index, :8]
    zero: np.ndarray = np.logical_not(heads.any(axis=1))
    candidates = np.flatnonzero(zero)
    if len(candidates) == 0:
        return zero
    if rows is not None and len(candidates) == len(index):
        return np.logical_not(rows.any(axis=1))
    zero[candidates] = np.logical_not(words[index[candidates]].any(axis=1))
    return zero


def _walk_plan(
    needed: np.ndarray | None, npages: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Page ranges of ``npages`` to walk and to skip: the runs of WINDOW_PAGES stretches
    holding a needed page, or (``needed`` None, or many of them) all of it in one walk."""
    if needed is None:
        return [(0, npages)], []
    stretches = -(-npages // WINDOW_PAGES)
    padded = np.zeros(stretches * WINDOW_PAGES, dtype=bool)
    padded[:npages] = needed
    wanted = padded.reshape(stretches, WINDOW_PAGES).any(axis=1)
    if np.count_nonzero(wanted) > _PARTIAL_WALK_SHARE * stretches:
        return [(0, npages)], []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], wanted, [False])).astype(np.int8)))
    walk = [
        (int(a) * WINDOW_PAGES, min(int(b) * WINDOW_PAGES, npages)) for a, b in edges.reshape(-1, 2)
    ]
    bounds = [0, *(page for run in walk for page in run), npages]
    skip = [
        (bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2) if bounds[i] < bounds[i + 1]
    ]
    return walk, skip


def seek_hole_pages(block: RamBlock, present: np.ndarray | None = None) -> np.ndarray:
    """One bool per target page: a hole in the block's memfd (SEEK_DATA/SEEK_HOLE, which
    count a swapped-out shmem page as data).

    ``present``: (n, 2) sorted, disjoint [start, end) page ranges known to hold data; then
    only the gaps between them are asked (all of the memfd if there are many gaps).
    """
    npages = block.spec.target_pages
    holes = np.ones(npages, dtype=bool)
    if present is None or len(present) >= _MAX_SEEK_GAPS:
        gaps = [(0, npages)]
    else:
        known = np.clip(present, 0, npages).tolist()
        bounds = [0, *(page for run in known for page in run), npages]
        gaps = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
        for start, end in known:
            holes[start:end] = False
    for first, last in gaps:
        if first >= last:
            continue
        for start, end in block.data_ranges(first * TARGET_PAGE_SIZE, last * TARGET_PAGE_SIZE):
            holes[start // TARGET_PAGE_SIZE : -(-end // TARGET_PAGE_SIZE)] = False
    return holes


async def send_part(
    channel: MigrationChannel,
    ram: RamSaver,
    limiter: RateLimiter,
    *,
    section_id: int,
    flush_bytes: int,
    slice_seconds: float,
) -> bool:
    """Send one precopy PART section of dirty pages, at most ``slice_seconds`` long, within
    the rate limit; True when no dirty page is left (the pass is complete)."""
    channel.put(codec.encode_section_part(section_id))
    deadline = time.monotonic() + slice_seconds
    finished = False
    queued = 0
    while True:
        window = ram.next_dirty_window()
        if window is None:
            finished = True
            break
        queued += ram.queue_window(channel, *window)
        if queued >= flush_bytes:
            await channel.flush()
            await limiter.wait(queued)
            queued = 0
            if time.monotonic() >= deadline:
                break
    channel.put(codec.encode_ram_section_close(section_id))
    await channel.flush()
    await limiter.wait(queued)
    return finished
