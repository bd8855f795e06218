"""The source reads guest pages without ever allocating one (docs/correctness.md).

A read through a mapping of a page the guest has just punched out allocates it again, so
the hole the next sync looks for is gone; a punch in the middle of the kernel's copy
tears the page (old data, then zeros) and nothing says it changed: the destination keeps
the old data. These tests pin the property the fix rests on (pread, which allocates
nothing) and the detection built on it, for shmem and hugetlb blocks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import trio

from trimig.channel import MigrationChannel
from trimig.kernel.memory import HUGE_PAGE_SIZE, punch_hole
from trimig.kernel.uffd import Feature, Mode, Userfaultfd
from trimig.kernel.witness import DiscardWitness
from trimig.migration import SourceStats
from trimig.ram_blocks import RamBlock, RamBlockSpec, create_blocks
from trimig.savevm.ram_saver import WINDOW_PAGES, DirtyLog, RamSaver, seek_hole_pages
from trimig.transports import SocketStream

PAGE = 4096


class NoWrites:
    """A dirty log in which the guest wrote nothing (only discards happen here)."""

    def collect(self, dirty: dict[str, np.ndarray]) -> int:
        return 0

    def collect_last(
        self, dirty: dict[str, np.ndarray], needed: object = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        return 0, {}

    def hole_pages(self, block: RamBlock, present: np.ndarray | None = None) -> np.ndarray:
        return seek_hole_pages(block)


def is_hole(block: RamBlock, page: int) -> bool:
    """Whether target page ``page`` of a shmem block is a hole in its memfd."""
    offset = page * PAGE
    try:
        return os.lseek(block.fd, offset, os.SEEK_DATA) != offset
    except OSError:  # ENXIO: no data at or after it
        return True


async def send_all(saver: RamSaver, punch: object = None) -> bytes:
    """Queue every dirty window, call ``punch()`` with the pages queued but not yet
    written, then flush into a socket; the bytes that went."""
    left, right = trio.socket.socketpair()
    sender = MigrationChannel(SocketStream(left, transport="unix", peer="pair"))
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            while data := await right.recv(1 << 20):
                received.extend(data)

        nursery.start_soon(drain)
        while (window := saver.next_dirty_window()) is not None:
            saver.queue_window(sender, *window)
        if callable(punch):
            punch()
        await sender.send_eof()
        await sender.aclose()
    right.close()
    return bytes(received)


async def test_a_page_punched_while_queued_stays_a_hole_and_goes_again() -> None:
    (block,) = create_blocks([RamBlockSpec("ram", 2 * WINDOW_PAGES * PAGE)])
    try:
        block.pages[:] = np.random.default_rng(1).integers(1, 256, (len(block.pages), PAGE))
        saver = RamSaver([block], SourceStats())
        saver.sync(NoWrites())  # type: ignore[arg-type]
        victims = [3, WINDOW_PAGES + 100]
        old = block.pages[victims].copy()

        def punch() -> None:
            for page in victims:
                punch_hole(block.fd, page * PAGE, PAGE)

        sent = await send_all(saver, punch)
        # What went is the data as read (one page-cache page each), not zeros or a mix ...
        for page in old:
            assert sent.count(page.tobytes()) == 1
        # ... and sending it filled no hole: the sync sees the discard and sends again.
        assert all(is_hole(block, page) for page in victims)
        assert saver.sync(NoWrites()) == len(victims)  # type: ignore[arg-type]
        assert np.flatnonzero(saver.dirty["ram"]).tolist() == victims
        await send_all(saver)
        assert saver.stats.duplicate == len(victims)  # they went as ZERO
        saver.close()
    finally:
        block.close()


@pytest.mark.parametrize("hugetlb", [False, True], ids=["shmem", "hugetlb"])
def test_the_discard_witness_allocates_nothing_and_sees_every_punch(
    hugetlb: bool, request: pytest.FixtureRequest
) -> None:
    page = HUGE_PAGE_SIZE if hugetlb else PAGE
    if hugetlb:
        request.getfixturevalue("hugepages")
    (block,) = create_blocks([RamBlockSpec("b", 4 * page, page if hugetlb else PAGE)])
    try:
        block.pages[0, 0] = 1
        block.pages[2 * (page // PAGE), 0] = 1
        blocks_before = os.fstat(block.fd).st_blocks
        with DiscardWitness(block.fd, block.size, block.page_size, hugetlb=hugetlb) as witness:
            witness.watch(0, block.size)  # pages 1 and 3 are holes: skipped, not allocated
            assert os.fstat(block.fd).st_blocks == blocks_before
            assert witness.watched().tolist() == [[0, page], [2 * page, 3 * page]]
            punch_hole(block.fd, 0, page)
            assert not block.pages[0].any()  # read back in: a fresh zero page, no hole
            assert witness.watched().tolist() == [[2 * page, 3 * page]]
            witness.watch(0, block.size)  # watching again maps what the file holds now
            assert witness.watched().tolist() == [[0, page], [2 * page, 3 * page]]
    finally:
        block.close()


@pytest.mark.usefixtures("hugepages")
async def test_a_hugetlb_page_punched_while_queued_goes_again() -> None:
    (block,) = create_blocks([RamBlockSpec("huge", 2 * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)])
    try:
        block.pages[:] = 7
        saver = RamSaver([block], SourceStats())
        try:
            saver.sync(NoWrites())  # type: ignore[arg-type]
            await send_all(saver, lambda: punch_hole(block.fd, HUGE_PAGE_SIZE, HUGE_PAGE_SIZE))
            per_huge = HUGE_PAGE_SIZE // PAGE
            assert saver.sync(NoWrites()) == per_huge  # type: ignore[arg-type]
            assert np.flatnonzero(saver.dirty["huge"]).tolist() == list(
                range(per_huge, 2 * per_huge)
            )
        finally:
            saver.close()
    finally:
        block.close()


async def test_a_page_punched_then_only_read_goes_again() -> None:
    """The guest punches a page the log protected, then reads it: the read faults a fresh
    zero page in, write-protected as the old one was (the punch left a uffd-wp marker), so
    the log has no write and the memfd no hole; even the page-frame number can stay the
    same (the kernel hands the freed page straight back to the fault). Only the witness
    mapping, whose entry the punch removed, tells: the page goes again, as ZERO."""
    (block,) = create_blocks([RamBlockSpec("ram", WINDOW_PAGES * PAGE)])
    uffd = Userfaultfd.create()
    try:
        uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM)
        uffd.register(block.mapping.address, block.size, Mode.WP)
        # This process plays the guest: its mapping of the block is the tracked one.
        log = DirtyLog(os.getpid(), [block], [block.mapping.address], uffd)  # type: ignore[arg-type]
        try:
            block.pages[7] = 0x5A
            saver = RamSaver([block], SourceStats())
            saver.sync(log)
            await send_all(saver)
            assert saver.sync(log) == 0  # nothing written, nothing discarded
            punch_hole(block.fd, 7 * PAGE, PAGE)
            assert not block.pages[7].any()  # the read: a fresh zero page, no write
            assert not is_hole(block, 7)
            assert saver.sync(log) == 1
            assert np.flatnonzero(saver.dirty["ram"]).tolist() == [7]
            duplicates = saver.stats.duplicate
            await send_all(saver)
            assert saver.stats.duplicate == duplicates + 1
            assert saver.sync(log, final=True) == 0
        finally:
            saver.close()
            log.close()
    finally:
        block.close()
