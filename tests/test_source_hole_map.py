"""The source's hole map (DirtyLog.hole_pages): pages the guest maps present are data, the
rest is decided by SEEK_DATA/SEEK_HOLE. It must say exactly what a SEEK walk of the whole
memfd says, above all never "hole" for a page that holds data. A real guest process, its
real page tables, real holes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import numpy as np
import pytest
import trio

from trimig.demo import running_guest
from trimig.guest.host import workload_command
from trimig.kernel.memory import punch_hole
from trimig.migration import SourceStats
from trimig.ram_blocks import RamBlock, RamBlockSpec
from trimig.savevm import ram_saver
from trimig.savevm.ram_saver import DirtyLog, RamSaver, seek_hole_pages

PAGE = 4096
PAGES = 2048


@pytest.mark.parametrize("many_gaps", [False, True], ids=["few-gaps", "many-gaps"])
async def test_hole_map_matches_a_full_seek_walk(
    many_gaps: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if many_gaps:  # the fallback: one SEEK walk over everything
        monkeypatch.setattr(ram_saver, "_MAX_SEEK_GAPS", 2)
    command = workload_command(fill="random", dirty_rate="4K")
    async with running_guest([RamBlockSpec("pc.ram", PAGES * PAGE)], command) as (guest, blocks):
        [block] = blocks
        await guest.stop()
        uffd, addresses = await guest.track_dirty()
        log = DirtyLog(guest.pid, blocks, addresses, uffd)
        try:
            # Holes: the guest's page tables lose them too.
            for first, count in ((10, 1), (100, 37), (1500, 300), (PAGES - 5, 5)):
                punch_hole(block.fd, first * PAGE, count * PAGE)
            # Data the guest does not map: written into the file after a punch (its page
            # table entry stays empty). The scan must leave these to SEEK, which says data.
            for page in (101, 120, 1600, PAGES - 1):
                os.pwrite(block.fd, b"\x5a" * PAGE, page * PAGE)
            expected = seek_hole_pages(block)
            assert not expected[[101, 120, 1600, PAGES - 1]].any()
            assert expected[[10, 100, 136, 1500, 1799, PAGES - 2]].all()
            holes = log.hole_pages(block)
            np.testing.assert_array_equal(holes, expected)
            # And the scan did see the pages the guest maps (the point of it).
            present = log._scanner.present(addresses[0], addresses[0] + block.size)
            assert len(present) >= 3
        finally:
            with trio.CancelScope(shield=True):
                await guest.untrack_dirty()
            log.close()


@contextlib.asynccontextmanager
async def stopped_after_a_sweep(
    pages: int, punches: list[tuple[int, int]]
) -> AsyncIterator[tuple[RamBlock, DirtyLog]]:
    """A guest tracked from a first collect, run for 50 ms (it sweeps on from page 0),
    stopped, then ``punches`` (first page, count) punched out of its memfd."""
    command = workload_command(fill="random", dirty_rate="100M")
    async with running_guest([RamBlockSpec("pc.ram", pages * PAGE)], command) as (guest, blocks):
        [block] = blocks
        uffd, addresses = await guest.track_dirty()
        log = DirtyLog(guest.pid, blocks, addresses, uffd)
        try:
            log.collect({block.name: np.zeros(pages, dtype=bool)})  # protect every page
            await trio.sleep(0.05)
            await guest.stop()
            for first, count in punches:
                punch_hole(block.fd, first * PAGE, count * PAGE)
            yield block, log
        finally:
            with trio.CancelScope(shield=True):
                await guest.untrack_dirty()
            log.close()


async def test_the_last_collect_finds_the_same_pages_in_one_walk() -> None:
    """DirtyLog.collect_last (the final sync, the guest stopped): the written pages that
    collect finds and the present ranges that give the same hole map, from one scan."""
    async with stopped_after_a_sweep(PAGES, [(10, 1), (1500, 300)]) as (block, log):
        last = {block.name: np.zeros(PAGES, dtype=bool)}
        newly, present = log.collect_last(last)
        # It protected nothing again: collect still finds exactly those pages.
        again = {block.name: np.zeros(PAGES, dtype=bool)}
        assert log.collect(again) == newly > 0
        np.testing.assert_array_equal(last[block.name], again[block.name])
        np.testing.assert_array_equal(
            log.hole_pages(block, present[block.name]), seek_hole_pages(block)
        )
        assert seek_hole_pages(block)[[10, 1500, 1799]].all()


async def test_the_last_collect_walks_only_where_pages_matter() -> None:
    """collect_last with few needed pages walks only their 2 MiB stretches: there it finds
    the written pages and the holes a full walk finds; the stretches it skips count as
    data (never a hole, even where the memfd has one: the safe side)."""
    pages = 8 * 512  # eight 2 MiB stretches
    async with stopped_after_a_sweep(pages, [(700, 10), (3100, 20)]) as (block, log):
        needed = np.zeros(pages, dtype=bool)
        needed[[600, 700, 1100]] = True  # stretches 1 and 2 only
        partial = {block.name: np.zeros(pages, dtype=bool)}
        newly, present = log.collect_last(partial, {block.name: needed})
        full = {block.name: np.zeros(pages, dtype=bool)}
        log.collect_last(full)
        walked = np.zeros(pages, dtype=bool)
        walked[512:1536] = True
        assert full[block.name][:512].any(), "the guest wrote nothing in stretch 0"
        np.testing.assert_array_equal(partial[block.name], full[block.name] & walked)
        assert newly == np.count_nonzero(partial[block.name])
        holes = log.hole_pages(block, present[block.name])
        truth = seek_hole_pages(block)
        np.testing.assert_array_equal(holes[walked], truth[walked])
        assert holes[700:710].all() and truth[3100:3120].all()
        assert not holes[~walked].any()


async def test_the_hole_map_comes_back_whole_after_the_switch() -> None:
    """A final sync right after the start skips every stretch (all dirty, none sent) and
    calls them data; RamSaver.refresh_holes, once nothing changes, finds the holes again."""
    async with stopped_after_a_sweep(PAGES, [(10, 1), (1500, 300)]) as (block, log):
        ram = RamSaver([block], SourceStats())
        try:
            ram.sync(log)  # the start: every page dirty
            with pytest.raises(RuntimeError, match="before the final sync"):
                ram.refresh_holes(log)
            ram.sync(log, final=True)
            assert not ram._holes[block.name].any()  # skipped: data, the safe side
            ram.refresh_holes(log)
            np.testing.assert_array_equal(ram._holes[block.name], seek_hole_pages(block))
            assert ram._holes[block.name][[10, 1500, 1799]].all()
        finally:
            ram.close()
