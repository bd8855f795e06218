"""The guest's userfaultfds: dirty tracking seen by PAGEMAP_SCAN, postcopy MISSING faults."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import trio

from trimig.errors import GuestError
from trimig.guest.host import GuestProcess, workload_command
from trimig.kernel.pagemap import PagemapScanner
from trimig.kernel.uffd import Userfaultfd
from trimig.ram_blocks import RamBlock, RamBlockSpec

MiB = 1 << 20
PAGE = 4096
LAYOUTS = {
    "4k": [RamBlockSpec("ram.a", 4 * MiB), RamBlockSpec("ram.b", 2 * MiB)],
    "hugetlb": [RamBlockSpec("ram", 2 * MiB), RamBlockSpec("huge", 2 * MiB, 2 * MiB)],
}


@pytest.fixture(params=sorted(LAYOUTS))
def specs(request: pytest.FixtureRequest) -> list[RamBlockSpec]:
    if request.param == "hugetlb":
        request.getfixturevalue("hugepages")
    return LAYOUTS[request.param]


def counters(blocks: Sequence[RamBlock]) -> np.ndarray:
    return np.concatenate([block.pages.view("<u8")[:, 0].copy() for block in blocks])


def page_starts(blocks: Sequence[RamBlock]) -> list[int]:
    starts, total = [], 0
    for block in blocks:
        starts.append(total)
        total += block.size // PAGE
    return starts


async def test_track_dirty_reports_exactly_the_written_pages(start_guest, make_blocks, specs):
    blocks = make_blocks(specs)
    guest: GuestProcess = await start_guest(workload_command(dirty_rate="8M"))
    addresses = await guest.attach(blocks, "new")
    uffd, tracked = await guest.track_dirty()
    assert isinstance(uffd, Userfaultfd) and tracked == addresses
    assert (await guest.query())["dirty_tracked"] is True
    with pytest.raises(GuestError, match="already on"):
        await guest.track_dirty()
    starts = page_starts(blocks)
    with uffd, PagemapScanner(guest.pid) as scanner:
        # Nothing is protected yet: every page the fill wrote counts as written.
        for block, address in zip(blocks, addresses, strict=True):
            ranges = scanner.take_written(address, address + block.size)
            assert ranges.tolist() == [[address, address + block.size]]
            assert len(scanner.take_written(address, address + block.size)) == 0
        before = counters(blocks)
        await guest.cont()
        await trio.sleep(0.3)
        await guest.stop()
        changed = set(np.flatnonzero(counters(blocks) != before).tolist())
        assert changed, "the guest wrote nothing"
        written: set[int] = set()
        for index, (block, address) in enumerate(zip(blocks, addresses, strict=True)):
            for start, end in scanner.take_written(address, address + block.size).tolist():
                assert (start - address) % block.page_size == 0
                assert (end - address) % block.page_size == 0
                first = starts[index] + (start - address) // PAGE
                written.update(range(first, first + (end - start) // PAGE))
        # Exactly the host pages holding a changed counter (huge pages are reported whole).
        expected: set[int] = set()
        for page in changed:
            index = max(i for i, start in enumerate(starts) if start <= page)
            per_host_page = blocks[index].page_size // PAGE
            first = page - (page - starts[index]) % per_host_page
            expected.update(range(first, first + per_host_page))
        assert written == expected
    await guest.untrack_dirty()
    assert (await guest.query())["dirty_tracked"] is False
    assert (await guest.verify()).verified


async def test_postcopy_destination_faults_are_resolved_by_the_engine(
    start_guest, make_blocks, specs
):
    source_blocks = make_blocks(specs)
    source = await start_guest()
    await source.attach(source_blocks, "new")
    await source.cont()
    await trio.sleep(0.1)
    await source.stop()
    state = await source.save_state()

    destination_blocks = make_blocks(specs)
    # Precopy sent the first half of the first block already.
    precopied = source_blocks[0].size // 2
    destination_blocks[0].pages[: precopied // PAGE] = source_blocks[0].pages[: precopied // PAGE]
    destination = await start_guest()
    addresses = await destination.attach(destination_blocks, "postcopy")
    uffd, registered = await destination.register_missing()
    assert registered == addresses
    await destination.notify("postcopy-start")
    status = await destination.query()
    assert status["discard_inhibited"] and status["missing_registered"]
    with pytest.raises(GuestError, match="registered for missing pages"):
        await destination.track_dirty()
    await destination.load_state(state)

    faults: list[tuple[int, int]] = []

    async def resolve_faults() -> None:
        while True:
            await trio.lowlevel.wait_readable(uffd.fileno())
            for fault in uffd.read_faults():
                index = next(
                    i
                    for i, block in enumerate(destination_blocks)
                    if addresses[i] <= fault.address < addresses[i] + block.size
                )
                page_size = destination_blocks[index].page_size
                offset = (fault.address - addresses[index]) // page_size * page_size
                faults.append((index, offset))
                source_address = source_blocks[index].mapping.address + offset
                uffd.copy(addresses[index] + offset, source_address, page_size, page_size=page_size)

    with uffd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resolve_faults)
            await destination.cont()
            await trio.sleep(0.1)
            await destination.stop()
            verdict = await destination.verify()  # touches every page
            nursery.cancel_scope.cancel()
    assert verdict.verified, verdict.detail
    assert verdict.raw["generation"] == 1
    assert faults, "the destination never faulted"
    assert all(not (index == 0 and offset < precopied) for index, offset in faults)
    assert len(set(faults)) == len(faults), "a page faulted twice"
    expected_faults = (source_blocks[0].size - precopied) // PAGE + sum(
        block.size // block.page_size for block in source_blocks[1:]
    )
    assert len(faults) == expected_faults

    await destination.notify("postcopy-end")
    await destination.unregister_missing()
    status = await destination.query()
    assert not status["discard_inhibited"] and not status["missing_registered"]
    await destination.cont()  # runs on, nothing missing any more
    await trio.sleep(0.05)
    await destination.stop()
    assert (await destination.verify()).verified


async def test_register_missing_needs_role_postcopy(start_guest, make_blocks):
    guest = await start_guest()
    await guest.attach(make_blocks(LAYOUTS["4k"]), "new")
    with pytest.raises(GuestError, match="needs role 'postcopy'"):
        await guest.register_missing()


async def test_guest_blocked_on_a_fault_wakes_when_the_engine_closes_its_uffd(
    start_guest, make_blocks
):
    """The guest keeps no copy of the MISSING uffd: if the engine's copy goes (the engine
    died, say), a guest blocked on a missing page is woken instead of hanging forever."""
    specs = LAYOUTS["4k"]
    source = await start_guest()
    await source.attach(make_blocks(specs), "new")
    state = await source.save_state()
    destination = await start_guest()
    await destination.attach(make_blocks(specs), "postcopy")
    uffd, _ = await destination.register_missing()
    await destination.load_state(state)
    await destination.cont()
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(uffd.fileno())
    assert uffd.read_faults(), "the guest did not fault"
    with pytest.raises(GuestError, match="did not answer ping"):
        await destination.ping(timeout=0.3)  # blocked in the kernel on the fault
    uffd.close()
    await destination.stop(timeout=5)
    verdict = await destination.verify()
    assert not verdict.verified  # the missing pages came back as zeros
    assert verdict.raw["bad_page"]["page"] == 0
