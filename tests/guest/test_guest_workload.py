"""The built-in workload guest, run as a real process on real memfds."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pytest
import trio

from trimig.errors import GuestError
from trimig.guest.host import GuestProcess, workload_command
from trimig.guest.workload import WORDS_PER_PAGE, fill_chunk
from trimig.ram_blocks import RamBlock, RamBlockSpec

MiB = 1 << 20
SPECS = [RamBlockSpec("ram.a", 4 * MiB), RamBlockSpec("ram.b", 2 * MiB)]


def counters(blocks: Sequence[RamBlock]) -> np.ndarray:
    """Every page's counter, read through the engine's own mappings."""
    return np.concatenate([block.pages.view("<u8")[:, 0].copy() for block in blocks])


def copy_memory(source: Sequence[RamBlock], destination: Sequence[RamBlock]) -> None:
    for src, dst in zip(source, destination, strict=True):
        dst.pages[...] = src.pages


async def run_for(guest: GuestProcess, seconds: float) -> None:
    await guest.cont()
    await trio.sleep(seconds)
    await guest.stop()


async def test_new_guest_runs_stops_and_verifies(start_guest, make_blocks):
    blocks = make_blocks(SPECS)
    guest = await start_guest(workload_command(dirty_rate="50M", seed=7))
    addresses = await guest.attach(blocks, "new")
    assert len(addresses) == 2 and addresses[0] != addresses[1]
    first = await guest.verify()
    assert first.verified, first.detail
    assert (first.raw["pass"], first.raw["cursor"]) == (0, 0)
    # Role new with random fill: counters 0, the rest the regenerated fill.
    expected = fill_chunk(7, 0, 0, 256)
    assert np.array_equal(blocks[0].pages[:256].view("<u8")[:, 1:], expected[:, 1:])
    assert not counters(blocks).any()

    await guest.cont()
    assert guest.running
    await trio.sleep(0.3)
    await guest.stop()
    assert not guest.running
    stopped = counters(blocks)
    assert stopped.any(), "the guest did not run"
    await trio.sleep(0.1)
    assert np.array_equal(counters(blocks), stopped), "memory changed after stop"

    state = await guest.save_state()
    verdict = await guest.verify()
    assert verdict.verified, verdict.detail
    assert verdict.raw["generation"] == 1
    total = len(stopped)
    assert verdict.raw["page_count"] == total
    # The memory matches the state: pages before the cursor hold pass + 1.
    cursor, passes = verdict.raw["cursor"], verdict.raw["pass"]
    assert (stopped[:cursor] == passes + 1).all() and (stopped[cursor:] == passes).all()
    assert b'"generation":1' in state


async def test_migrated_copy_verifies_and_continues(start_guest, make_blocks):
    source_blocks = make_blocks(SPECS)
    source = await start_guest(workload_command(seed=3))
    await source.attach(source_blocks, "new")
    await run_for(source, 0.2)
    state = await source.save_state()
    saved = await source.verify()
    assert saved.verified, saved.detail

    destination_blocks = make_blocks(SPECS)
    copy_memory(source_blocks, destination_blocks)
    destination = await start_guest(workload_command(seed=99))  # the state's seed wins
    await destination.attach(destination_blocks, "incoming")
    with pytest.raises(GuestError, match="load-state"):
        await destination.cont()
    await destination.load_state(state)
    verdict = await destination.verify()
    assert verdict.verified, verdict.detail
    for key in ("pass", "cursor", "generation", "seed"):
        assert verdict.raw[key] == saved.raw[key]

    before = counters(destination_blocks)
    await run_for(destination, 0.2)
    assert not np.array_equal(counters(destination_blocks), before), "destination did not run"
    again = await destination.verify()
    assert again.verified, again.detail
    await destination.save_state()
    assert (await destination.verify()).raw["generation"] == 2


async def test_stop_and_save_gives_the_state_of_the_stopped_memory(start_guest, make_blocks):
    """The workload's stop with save-state: the state in the reply is the one a separate
    save-state would give, and a copy of the memory verifies against it."""
    source_blocks = make_blocks(SPECS)
    source = await start_guest(workload_command(dirty_rate="50M", seed=5))
    await source.attach(source_blocks, "new")
    await source.cont()
    await trio.sleep(0.2)
    state = await source.stop_and_save()
    assert state is not None and b'"generation":1' in state
    assert not source.running
    stopped = counters(source_blocks)
    await trio.sleep(0.1)
    assert np.array_equal(counters(source_blocks), stopped), "memory changed after stop"
    destination_blocks = make_blocks(SPECS)
    copy_memory(source_blocks, destination_blocks)
    destination = await start_guest(workload_command(seed=5))
    await destination.attach(destination_blocks, "incoming")
    await destination.load_state(state)
    verdict = await destination.verify()
    assert verdict.verified, verdict.detail
    assert verdict.raw["pass"] > 0 or verdict.raw["cursor"] > 0, "the source did not run"


async def test_corrupt_counter_is_named(start_guest, make_blocks):
    blocks = make_blocks(SPECS)
    guest = await start_guest()
    await guest.attach(blocks, "new")
    await run_for(guest, 0.1)
    bad_page = 1024 + 37  # page 37 of the second block
    blocks[1].pages[37].view("<u8")[0] += 5
    verdict = await guest.verify()
    assert not verdict.verified
    bad = verdict.raw["bad_page"]
    assert (bad["page"], bad["block"], bad["offset"], bad["what"]) == (
        bad_page,
        "ram.b",
        37 * 4096,
        "counter",
    )
    assert bad["found"] == bad["expected"] + 5
    assert f"page {bad_page} " in verdict.detail and "'ram.b'" in verdict.detail
    assert "breaks the one-step pattern" in verdict.detail


async def test_corrupt_fill_byte_is_named(start_guest, make_blocks):
    blocks = make_blocks(SPECS)
    guest = await start_guest()
    await guest.attach(blocks, "new")
    blocks[0].pages[900, 1000] ^= 0xFF
    verdict = await guest.verify()
    assert not verdict.verified
    bad = verdict.raw["bad_page"]
    assert (bad["page"], bad["what"], bad["byte"]) == (900, "fill", 1000)
    assert bad["found"] == bad["expected"] ^ 0xFF
    assert "page 900 " in verdict.detail


async def test_stale_state_is_detected(start_guest, make_blocks):
    """Memory that ran on after the state was saved: the state did not continue."""
    source_blocks = make_blocks(SPECS)
    source = await start_guest(workload_command(dirty_rate="20M"))
    await source.attach(source_blocks, "new")
    await run_for(source, 0.1)
    stale = await source.save_state()
    await run_for(source, 0.2)

    destination_blocks = make_blocks(SPECS)
    copy_memory(source_blocks, destination_blocks)
    destination = await start_guest()
    await destination.attach(destination_blocks, "incoming")
    await destination.load_state(stale)
    verdict = await destination.verify()
    assert not verdict.verified
    assert "did not continue" in verdict.detail
    assert verdict.raw["memory_pass"] is not None


async def test_state_for_other_memory_is_refused(start_guest, make_blocks):
    small = make_blocks([RamBlockSpec("small", 1 * MiB)])
    source = await start_guest()
    await source.attach(small, "new")
    state = await source.save_state()
    destination = await start_guest()
    await destination.attach(make_blocks(SPECS), "incoming")
    with pytest.raises(GuestError, match="256 pages"):
        await destination.load_state(state)
    with pytest.raises(GuestError, match="not a trimig-workload device state"):
        await destination.load_state(b'{"x": 1}')


async def test_zero_fill_leaves_untouched_pages_as_holes(start_guest, make_blocks):
    blocks = make_blocks(SPECS)
    guest = await start_guest(workload_command(fill="zero", dirty_rate="4M"))
    await guest.attach(blocks, "new")
    for block in blocks:  # nothing written yet: the memfds are all hole
        with pytest.raises(OSError):
            os.lseek(block.fd, 0, os.SEEK_DATA)
    await run_for(guest, 0.1)
    verdict = await guest.verify()
    assert verdict.verified, verdict.detail
    blocks[1].pages[5, 4095] = 1
    verdict = await guest.verify()
    assert not verdict.verified and verdict.raw["bad_page"]["page"] == 1024 + 5


async def test_dirty_rate_limits_the_sweep(start_guest, make_blocks):
    blocks = make_blocks(SPECS)
    guest = await start_guest(workload_command(dirty_rate="4M"))  # 1024 pages/s
    await guest.attach(blocks, "new")
    await run_for(guest, 0.5)
    verdict = await guest.verify()
    touched = verdict.raw["pass"] * verdict.raw["page_count"] + verdict.raw["cursor"]
    # Loose bounds: this checks the limiter works at all, not its precision.
    assert 100 < touched < 3 * 512 + 200, touched


async def test_running_guest_refuses_state_and_verify(start_guest, make_blocks):
    guest = await start_guest()
    with pytest.raises(GuestError, match="attach first"):
        await guest.cont()
    await guest.attach(make_blocks(SPECS), "new")
    await guest.cont()
    for request in (guest.save_state, guest.verify):
        with pytest.raises(GuestError, match="stop it first"):
            await request()
    await guest.stop()
    assert (await guest.verify()).verified


async def test_hugetlb_block(start_guest, make_blocks, hugepages):
    specs = [RamBlockSpec("ram", 1 * MiB), RamBlockSpec("huge", 2 * MiB, 2 * MiB)]
    blocks = make_blocks(specs)
    guest = await start_guest()
    await guest.attach(blocks, "new")
    await run_for(guest, 0.1)
    verdict = await guest.verify()
    assert verdict.verified, verdict.detail
    assert verdict.raw["page_count"] == 256 + 512
    pages = blocks[1].pages.view("<u8").reshape(-1, WORDS_PER_PAGE)
    assert pages[:, 0].any()
