"""Lazy restore: the guest runs at once; its pages come from the snapshot as it faults.

As a postcopy destination (``loadvm/postcopy.py``) with the file in the source's place:
the guest attaches its blocks in role ``postcopy``, registers them MISSING with its own
userfaultfd and hands that over. Two OS threads, owned by :meth:`LazyRestore.run`, serve it:

* the **fault thread** (urgent priority): each fault is noted by the postcopy
  ``FaultHandler`` (the shared step: skip what is placed, time the request), its host page
  read from its slot with pread (bits clear read as zero) and placed atomically with
  UFFDIO_COPY, or UFFDIO_ZEROPAGE when no bit of it is set;
* the **fill thread**, started once the guest runs: the rest in block and address order,
  2 MiB at a time, skipping pages already placed; zero pages are left as holes (a fault
  on one is placed as ZEROPAGE; after the end the memfd reads them as zero).

Both place through one ``PagePlacer`` (each on its own channel), which keeps the received
bitmap and skips a page the other placed first. Statistics are postcopy's (requests,
latency percentiles, blocktime). Once the fill is done the uffd is closed (ending the
registration), the guest is told, and discards are allowed again.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import numpy as np
import trio

from .._trio import open_nursery
from ..codec.constants import TARGET_PAGE_SIZE
from ..guest.host import GuestProcess
from ..kernel.probe import probe
from ..kernel.uffd import Userfaultfd
from ..loops import serve_fd_in_thread
from ..postcopy import (
    FaultHandler,
    GuestRamBlock,
    PagePlacer,
    PageRequest,
    ReceivedBitmap,
    check_postcopy_support,
)
from ..ram_blocks import RamBlock
from ..threads import StopSignal, run_in_thread
from .file import Snapshot, SnapshotBlock

log = logging.getLogger("trimig.snapshot")

FILL_CHANNEL = 0
FAULT_CHANNEL = 1
#: Target pages the fill thread reads at a time (2 MiB: one hugetlb host page).
FILL_CHUNK_PAGES = 512
#: A fault in a 4 KiB block brings the data pages of this many pages from it on (64 KiB).
FAULT_AROUND = 16


class LazyRestore:
    """Restores one guest lazily from ``snapshot`` into fresh ``blocks``."""

    def __init__(self, snapshot: Snapshot, blocks: Sequence[RamBlock], guest: GuestProcess) -> None:
        self.snapshot = snapshot
        self.blocks = list(blocks)
        self.guest = guest
        self.received = ReceivedBitmap(self.blocks)
        self.faults: FaultHandler | None = None
        self.placer: PagePlacer | None = None
        self._uffd: Userfaultfd | None = None
        #: Monotonic ns: the guest was told to run / the fill thread finished.
        self.running_ns = 0
        self.filled_ns = 0
        self.filled_pages = 0
        #: (block, target page) of the last fault served: where the fill goes on.
        self._hint: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register the guest's memory, load its device state, run it (then ``started``),
        fill the rest and end the registration. The guest runs on afterwards."""
        check_postcopy_support(self.blocks, probe())
        await self.guest.attach(self.blocks, "postcopy")
        self._uffd, addresses = await self.guest.register_missing()
        try:
            guest_blocks = [
                GuestRamBlock(block.name, address, block.size, block.page_size, block.fd)
                for block, address in zip(self.blocks, addresses, strict=True)
            ]
            self.faults = FaultHandler(self._uffd, guest_blocks, self.received, _no_request)
            self.placer = PagePlacer(
                self._uffd,
                guest_blocks,
                self.received,
                channels=2,
                on_placed=self.faults.pages_placed,
                on_page_placed=self.faults.page_placed,
            )
            async with open_nursery() as nursery:
                await nursery.start(
                    functools.partial(run_in_thread, self._serve_faults, urgent=True)
                )
                # No discard while pages may still come from the file: a discarded page
                # would be filled with its old contents.
                await self.guest.notify("postcopy-start")
                await self.guest.load_state(self.snapshot.device_state, progress=self._placed)
                await self.guest.cont()
                self.running_ns = time.monotonic_ns()
                task_status.started()
                await run_in_thread(self._fill)
                self.filled_ns = time.monotonic_ns()
                nursery.cancel_scope.cancel()  # the fault thread: every data page is placed
        finally:
            self.close()
        await self.guest.unregister_missing()
        await self.guest.notify("postcopy-end")

    def close(self) -> None:
        """Close our uffd (ends the registration: a blocked guest thread retries and reads
        the memfd). Safe to repeat; the threads must be over."""
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None

    def _placed(self) -> int:
        return self.placer.stats.host_pages_placed if self.placer is not None else 0

    def statistics(self) -> dict[str, object]:
        """postcopy-requests, latency, its distribution and percentiles, blocktime."""
        return self.faults.stats().as_qmp() if self.faults is not None else {}

    # -- the threads ------------------------------------------------------------------

    def _serve_faults(self, stop: StopSignal) -> None:
        """The fault thread: each fault's host page from its slot, until ``stop``."""
        assert self._uffd is not None and self.faults is not None
        uffd, faults = self._uffd, self.faults
        largest = max(block.page_size for block in self.blocks) // TARGET_PAGE_SIZE
        buffer = np.empty((max(largest, FAULT_AROUND), TARGET_PAGE_SIZE), dtype=np.uint8)
        serve = functools.partial(self._serve, buffer=buffer)
        serve_fd_in_thread(uffd.fileno(), uffd.read_faults, stop, faults.note_fault, serve)

    def _serve(self, request: PageRequest, buffer: np.ndarray) -> None:
        """Place one faulted host page (its slot's bytes, or zero if no bit of it is set),
        which wakes the guest; then, in a 4 KiB block, the data pages among the next
        FAULT_AROUND - 1 (a guest that touched a page touches its neighbours next, and one
        pread and one UFFDIO_COPY cost little more for 64 KiB than for 4 KiB)."""
        assert self.placer is not None
        source = self.snapshot.blocks[request.block]
        first = request.start // TARGET_PAGE_SIZE
        count = request.length // TARGET_PAGE_SIZE
        self._hint = (request.block, first)
        offsets = np.arange(request.start, request.start + request.length, TARGET_PAGE_SIZE)
        if not source.present[first : first + count].any():
            self.placer.place_zero(request.block, offsets, channel=FAULT_CHANNEL)
        else:
            rows = buffer[:count]
            self.snapshot.read_pages(source, first, rows)
            self.placer.place(request.block, offsets, rows, channel=FAULT_CHANNEL)
        if count > 1:
            return
        start, end = first + 1, min(first + FAULT_AROUND, len(source.present))
        around = np.flatnonzero(source.present[start:end])
        if len(around) == 0:
            return
        last = int(around[-1]) + 1
        rows = buffer[:last]
        self.snapshot.read_pages(source, start, rows)
        self.placer.place(
            request.block, (around + start) * TARGET_PAGE_SIZE, rows[around], channel=FAULT_CHANNEL
        )

    def _fill(self, stop: StopSignal) -> None:
        """The fill thread: every data page not placed yet, until done or ``stop``. In
        block and address order, 2 MiB at a time; after a fault the order goes on from the
        faulted chunk (as postcopy's background stream follows the page requests), since
        a guest that touched a page is likely to touch its neighbours next."""
        buffer = np.empty((FILL_CHUNK_PAGES, TARGET_PAGE_SIZE), dtype=np.uint8)
        chunks = [
            (block, first)
            for block in self.blocks
            for first in range(0, block.spec.target_pages, FILL_CHUNK_PAGES)
        ]
        starts: dict[str, int] = {}  # block name -> index of its first chunk
        for index, (block, _first) in enumerate(chunks):
            starts.setdefault(block.name, index)
        done = np.zeros(len(chunks), dtype=bool)
        cursor = 0
        while not stop.is_set():
            hint, self._hint = self._hint, None
            if hint is not None:
                cursor = starts[hint[0]] + hint[1] // FILL_CHUNK_PAGES
            rest = np.flatnonzero(~done[cursor:])
            if len(rest):
                cursor += int(rest[0])
            else:
                rest = np.flatnonzero(~done[:cursor])
                if not len(rest):
                    return
                cursor = int(rest[0])
            block, first = chunks[cursor]
            self._fill_chunk(
                self.snapshot.blocks[block.name], first, block.page_size // TARGET_PAGE_SIZE, buffer
            )
            done[cursor] = True
            cursor = min(cursor + 1, len(chunks) - 1)

    def _fill_chunk(
        self, source: SnapshotBlock, first: int, per_host: int, buffer: np.ndarray
    ) -> None:
        """Pages ``[first, first + FILL_CHUNK_PAGES)``: the host pages that hold data and
        are not placed yet, read in one pread and placed."""
        assert self.placer is not None
        end = min(first + FILL_CHUNK_PAGES, len(source.present))
        present = source.present[first:end].reshape(-1, per_host).any(axis=1)
        received = self.received.block(source.name).bits[first:end].reshape(-1, per_host)
        todo = np.repeat(present & ~received.all(axis=1), per_host)
        if not todo.any():
            return
        rows = buffer[: end - first]
        self.snapshot.read_pages(source, first, rows)
        if todo.all():  # the common case: one UFFDIO_COPY of the whole chunk, no copy here
            offsets = np.arange(first, end, dtype=np.int64) * TARGET_PAGE_SIZE
            self.placer.place(source.name, offsets, rows, channel=FILL_CHANNEL)
            self.filled_pages += end - first
            return
        index = np.flatnonzero(todo)
        offsets = (index + first) * TARGET_PAGE_SIZE
        self.placer.place(source.name, offsets, rows[index], channel=FILL_CHANNEL)
        self.filled_pages += len(index)


async def _no_request(block: str, start: int, length: int) -> None:
    """The FaultHandler's request callback: unused (the fault thread serves in place)."""
    raise AssertionError("lazy restore serves faults in its own thread")
