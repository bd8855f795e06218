"""FaultHandler bookkeeping with a controlled clock: requests, latency histogram,
blocktime, outstanding pages. (The real-kernel paths are in test_placement.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from trimig.errors import GuestError
from trimig.kernel import PageFault, Userfaultfd
from trimig.postcopy import faults
from trimig.postcopy.bitmaps import ReceivedBitmap
from trimig.postcopy.blocks import GuestRamBlock, PageRequest
from trimig.postcopy.faults import LATENCY_BUCKETS, FaultHandler, latency_bucket

PAGE = 4096
HUGE = 2 << 20
MS = 1_000_000
RAM = GuestRamBlock("ram", 0x7F00_0000_0000, 16 * PAGE, PAGE, -1)
HUGE_BLOCK = GuestRamBlock("huge", 0x7F00_4000_0000, 4 * HUGE, HUGE, -1)


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def fault(address: int, **flags: bool) -> PageFault:
    return PageFault(
        address,
        write=flags.get("write", False),
        wp=flags.get("wp", False),
        minor=flags.get("minor", False),
        thread_id=0,
    )


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    with Userfaultfd.create() as uffd:
        yield uffd


def make_handler(
    uffd: Userfaultfd, clock: Clock
) -> tuple[FaultHandler, list[PageRequest], ReceivedBitmap]:
    sent: list[PageRequest] = []

    async def request_page(block: str, start: int, length: int) -> None:
        sent.append(PageRequest(block, start, length))

    received = ReceivedBitmap([RAM, HUGE_BLOCK])
    handler = FaultHandler(uffd, [HUGE_BLOCK, RAM], received, request_page, clock=clock)
    return handler, sent, received


def test_latency_buckets_are_powers_of_two_microseconds() -> None:
    assert [latency_bucket(ns) for ns in (0, 999, 1000, 1999, 2000, 3999, 4000)] == [
        0,
        0,
        0,
        0,
        1,
        1,
        2,
    ]
    assert latency_bucket(1000 * 1023) == 9
    assert latency_bucket(1000 * 1024) == 10
    assert latency_bucket(1000 * (1 << 22)) == 22
    assert latency_bucket(1000 * (1 << 23)) == LATENCY_BUCKETS - 1
    assert latency_bucket(10**15) == LATENCY_BUCKETS - 1


async def test_latency_and_blocktime(uffd: Userfaultfd) -> None:
    clock = Clock()
    handler, sent, received = make_handler(uffd, clock)
    await handler.handle_fault(fault(RAM.address + 3 * PAGE + 17, write=True))  # t=0
    clock.now = 5 * MS
    await handler.handle_fault(fault(HUGE_BLOCK.address + HUGE + 12345))
    assert sent == [PageRequest("ram", 3 * PAGE, PAGE), PageRequest("huge", HUGE, HUGE)]
    assert handler.outstanding() == sent
    clock.now = 10 * MS
    received.mark("ram", 3 * PAGE)
    handler.pages_placed("ram", np.array([0, 3 * PAGE], dtype=np.int64))  # latency 10 ms
    assert handler.outstanding() == [PageRequest("huge", HUGE, HUGE)]
    clock.now = 12 * MS
    assert handler.stats().blocktime_ms == 12  # still blocked on the huge page
    clock.now = 20 * MS
    handler.page_placed("huge", HUGE)  # latency 15 ms; blocked from 0 to 20 ms
    clock.now = 30 * MS
    await handler.handle_fault(fault(RAM.address))
    clock.now = 31 * MS
    handler.page_placed("ram", 0)  # latency 1 ms; blocked 30..31 ms
    clock.now = 50 * MS
    stats = handler.stats()
    assert stats.requests == 3 and stats.faults == 3 and stats.outstanding == 0
    assert stats.blocktime_ms == 21
    assert stats.latency_ns == (10 + 15 + 1) * MS // 3
    expected = [0] * LATENCY_BUCKETS
    expected[13] = 2  # 10 ms and 15 ms: [8192, 16384) µs
    expected[9] = 1  # 1 ms = 1000 µs: [512, 1024) µs
    assert list(stats.latency_dist) == expected
    assert stats.as_qmp() == {
        "postcopy-requests": 3,
        "postcopy-latency": stats.latency_ns,
        "postcopy-latency-dist": expected,
        "postcopy-blocktime": 21,
        "postcopy-vcpu-blocktime": [21],
        "postcopy-vcpu-latency": [stats.latency_ns],
        "postcopy-non-vcpu-latency": 0,
        "x-postcopy-latency-p50": 10 * MS,
        "x-postcopy-latency-p99": 15 * MS,
    }
    assert sorted(handler.latencies().tolist()) == [1 * MS, 10 * MS, 15 * MS]


async def test_latency_percentiles_are_exact_over_the_recent_samples(
    uffd: Userfaultfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "LATENCY_SAMPLES", 100)
    clock = Clock()
    handler, _, received = make_handler(uffd, clock)
    assert (handler.stats().latency_p50_ns, handler.stats().latency_p99_ns) == (0, 0)
    # 150 faults with latencies 1..150 µs: only the last 100 (51..150 µs) are kept.
    for page in range(150):
        clock.now = page * MS
        await handler.handle_fault(fault(RAM.address + (page % 16) * PAGE))
        clock.now = page * MS + (page + 1) * 1000
        received.mark("ram", (page % 16) * PAGE)
        handler.page_placed("ram", (page % 16) * PAGE)
        received.clear("ram", (page % 16) * PAGE, PAGE)
    stats = handler.stats()
    assert sorted(handler.latencies().tolist()) == [us * 1000 for us in range(51, 151)]
    assert stats.latency_p50_ns == 100 * 1000  # nearest rank: the 50th of 100
    assert stats.latency_p99_ns == 149 * 1000
    assert stats.latency_ns == sum(range(1, 151)) * 1000 // 150  # the average covers all


async def test_received_pages_are_not_requested(uffd: Userfaultfd) -> None:
    handler, sent, received = make_handler(uffd, Clock())
    received.mark("huge", 0, HUGE)
    await handler.handle_fault(fault(HUGE_BLOCK.address + 5 * PAGE))
    assert sent == [] and handler.outstanding() == []
    assert handler.stats().faults == 1 and handler.stats().requests == 0


async def test_repeated_fault_is_recorded_once_but_resent(uffd: Userfaultfd) -> None:
    clock = Clock()
    handler, sent, _ = make_handler(uffd, clock)
    await handler.handle_fault(fault(RAM.address + PAGE))
    clock.now = 7 * MS
    await handler.handle_fault(fault(RAM.address + PAGE + 8))
    assert sent == [PageRequest("ram", PAGE, PAGE)] * 2
    assert handler.outstanding() == [PageRequest("ram", PAGE, PAGE)]
    clock.now = 9 * MS
    handler.page_placed("ram", PAGE)
    stats = handler.stats()
    assert stats.requests == 2 and stats.latency_ns == 9 * MS  # from the first fault
    handler.page_placed("ram", PAGE)  # no request left: ignored
    assert sum(handler.stats().latency_dist) == 1


async def test_bad_faults_are_guest_errors(uffd: Userfaultfd) -> None:
    handler, sent, _ = make_handler(uffd, Clock())
    with pytest.raises(GuestError, match="outside every registered RAM block"):
        await handler.handle_fault(fault(RAM.address + RAM.size))
    with pytest.raises(GuestError, match="outside every registered RAM block"):
        await handler.handle_fault(fault(RAM.address - PAGE))
    with pytest.raises(GuestError, match="unexpected write-protect userfault"):
        await handler.handle_fault(fault(RAM.address, wp=True))
    with pytest.raises(GuestError, match="unexpected minor userfault"):
        await handler.handle_fault(fault(RAM.address, minor=True))
    assert sent == []


def test_overlapping_blocks_are_refused(uffd: Userfaultfd) -> None:
    other = GuestRamBlock("other", RAM.address + PAGE, PAGE, PAGE, -1)

    async def request_page(block: str, start: int, length: int) -> None:
        pass

    with pytest.raises(ValueError, match="overlap"):
        FaultHandler(uffd, [RAM, other], ReceivedBitmap([RAM, other]), request_page)
