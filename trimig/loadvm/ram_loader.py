"""The destination's RAM loader for precopy: pages land straight in the blocks' memfds.

Zero pages are never allocated: a ZERO record for a page this loader never wrote
costs nothing (a fresh memfd reads as zero), and one for a page it did write
punches that page's hole again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .. import codec
from ..codec.constants import TARGET_PAGE_SIZE
from ..errors import RemoteProtocolError
from ..kernel.iov import write_rows_at
from ..kernel.memory import punch_hole
from ..postcopy.bitmaps import ReceivedBitmap
from ..ram_blocks import RamBlock


class RamLoader:
    """Applies decoded RAM events to the destination's blocks and keeps the received bitmap."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = {block.name: block for block in blocks}
        #: Pages this loader wrote data into (so a later ZERO must clear them).
        self.written = {b.name: np.zeros(b.spec.target_pages, dtype=bool) for b in blocks}
        #: Pages received at least once: the postcopy received bitmap starts from this.
        self.received = ReceivedBitmap(blocks)
        self.mem_size_seen = False

    def check_mem_size(self, event: codec.RamMemSize, *, postcopy: bool) -> None:
        """The source's block list must match ours: same names, same sizes, same page sizes."""
        for info in event.blocks:
            block = self.blocks.get(info.name)
            if block is None:
                raise RemoteProtocolError(
                    f"unknown RAM block {info.name!r} in the stream; this destination has "
                    f"{', '.join(sorted(self.blocks)) or 'no blocks'}"
                )
            if info.size != block.size:
                raise RemoteProtocolError(
                    f"RAM block {info.name!r} has {info.size} bytes in the stream but "
                    f"{block.size} here"
                )
            page_size = info.page_size or TARGET_PAGE_SIZE
            if postcopy and page_size != block.page_size:
                raise RemoteProtocolError(
                    f"RAM block {info.name!r} has page size {page_size} in the stream but "
                    f"{block.page_size} here"
                )
        missing = set(self.blocks) - {info.name for info in event.blocks}
        if missing:
            raise RemoteProtocolError(
                f"the stream does not carry RAM block(s) {', '.join(sorted(missing))}"
            )
        self.mem_size_seen = True

    def _block(self, name: str) -> RamBlock:
        if not self.mem_size_seen:
            raise RemoteProtocolError("RAM page record before the RAM block list (MEM_SIZE)")
        block = self.blocks.get(name)
        if block is None:
            raise RemoteProtocolError(f"page record for unknown RAM block {name!r}")
        return block

    def load_pages(self, event: codec.RamPages) -> None:
        """Copy a run of pages into the block.

        A run of consecutive pages that are holes in the memfd (a fresh destination) is
        written into the file with pwritev, which allocates each page as it fills it;
        through the mapping every page would first be faulted in and zeroed. Runs already
        allocated (and hugetlb blocks, which cannot be written as a file) are copied
        through the mapping.
        """
        block = self._block(event.block)
        index = (event.offsets // TARGET_PAGE_SIZE).astype(np.int64)
        first, count = int(index[0]), len(index)
        if count == 1 or bool((np.diff(index) == 1).all()):
            start = first * TARGET_PAGE_SIZE
            if block.spec.hugetlb or _allocated(block.fd, start, count * TARGET_PAGE_SIZE):
                block.pages[first : first + count] = event.pages
            else:
                write_rows_at(block.fd, start, event.pages)
            self.written[block.name][first : first + count] = True
            self.received.block(block.name).set_range(first, count)
        else:  # any order is valid on the wire, even if trimig's source sends runs
            block.pages[index] = event.pages
            self.written[block.name][index] = True
            self.received.block(block.name).set_pages(index)

    def load_zero_pages(self, event: codec.RamZeroPages) -> None:
        """Make pages zero without allocating them.

        A page we wrote is punched out of the memfd again; in a hugetlb block, where a
        hole can only be a whole huge page, it is zeroed in place instead (a partial punch
        zeroes in place only on Linux 6.2 and later)."""
        block = self._block(event.block)
        index = (event.offsets // TARGET_PAGE_SIZE).astype(np.int64)
        written = self.written[block.name]
        to_clear = index[written[index]]
        if block.spec.hugetlb:
            block.pages[to_clear] = 0
            self.received.block(block.name).set_pages(index)
            return  # still allocated: ``written`` stays set, a later ZERO re-zeroes it
        for start, end in _runs(to_clear):
            punch_hole(block.fd, start * TARGET_PAGE_SIZE, (end - start) * TARGET_PAGE_SIZE)
        written[to_clear] = False
        self.received.block(block.name).set_pages(index)

    def pages_written_remotely(self, event: codec.RamWritten) -> None:
        """The RDMA-shaped transport wrote ``npages`` pages into our region one-sided."""
        block = self._block(event.block)
        first = event.offset // TARGET_PAGE_SIZE
        if first + event.npages > block.spec.target_pages:
            raise RemoteProtocolError(
                f"one-sided write of {event.npages} pages at offset {event.offset} runs past "
                f"the end of RAM block {block.name!r}"
            )
        self.written[block.name][first : first + event.npages] = True
        self.received.block(block.name).set_range(first, event.npages)

    def discard(self, name: str, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD before LISTEN: free the range and forget it was received."""
        block = self._block(name)
        if start % block.page_size or length % block.page_size or start + length > block.size:
            raise RemoteProtocolError(
                f"discard of RAM block {name!r} (start {start:#x}, length {length:#x}) is not "
                f"host-page aligned or runs past the block's end {block.size:#x}"
            )
        punch_hole(block.fd, start, length)
        first, count = start // TARGET_PAGE_SIZE, length // TARGET_PAGE_SIZE
        self.written[name][first : first + count] = False
        self.received.block(name).clear_range(first, count)

    def take_zero_holes(self) -> dict[str, np.ndarray]:
        """At LISTEN: host pages received (as zero) but never written are still holes.

        A guest access to one faults although nothing more will come from the source,
        so these pages leave the received bitmap and are returned (one bool per target
        page) for the fault path to place zero locally.
        """
        holes: dict[str, np.ndarray] = {}
        for name, block in self.blocks.items():
            per_host = block.page_size // TARGET_PAGE_SIZE
            received = self.received.block(name).bits
            written = self.written[name]
            if per_host == 1:  # (reductions over rows of one cost ~3 ms per GiB, in the pause)
                hole = received & ~written
            else:
                whole = received.reshape(-1, per_host).all(axis=1)
                hole = np.repeat(whole & ~written.reshape(-1, per_host).any(axis=1), per_host)
            self.received.block(name).clear_where(hole)
            holes[name] = hole
        return holes


def _allocated(fd: int, start: int, length: int) -> bool:
    """Whether the run ``[start, start + length)`` of the memfd looks allocated: its first and
    last pages hold data. (Two SEEK_DATA calls, each cheap; SEEK_HOLE would walk every
    allocated page up to the next hole.) Either answer is safe, only the speed differs.
    """
    last = start + length - TARGET_PAGE_SIZE
    try:
        return (
            os.lseek(fd, start, os.SEEK_DATA) == start and os.lseek(fd, last, os.SEEK_DATA) == last
        )
    except OSError:  # ENXIO: no data at or after the offset
        return False


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted page indices into [start, end) runs of consecutive pages."""
    if len(index) == 0:
        return []
    index = np.sort(index)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([index[0]], index[breaks]))
    ends = np.concatenate((index[breaks - 1] + 1, [index[-1] + 1]))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
