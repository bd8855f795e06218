"""PagePlacer and FaultHandler against the real kernel: a child process maps the
engine's memfds, registers them with its own userfaultfd and reads pages; we serve
its faults in trio by placing pages through its uffd."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import numpy as np
import numpy.typing as npt
import pytest
import trio

from trimig._trio import open_nursery
from trimig.errors import GuestError, RemoteProtocolError
from trimig.postcopy.bitmaps import ReceivedBitmap
from trimig.postcopy.blocks import TARGET_PAGE_SIZE, GuestRamBlock, PageRequest
from trimig.postcopy.faults import LATENCY_BUCKETS, FaultHandler
from trimig.postcopy.placer import PREEMPT_CHANNEL, PagePlacer

from .conftest import Guest, as_records

PAGE = TARGET_PAGE_SIZE
HUGE = 2 << 20
TIMEOUT = 10


def random_pages(count: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE), dtype=np.uint8)


def sha(data: npt.NDArray[np.uint8] | bytes) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


@attrs.define
class Served:
    handler: FaultHandler
    placer: PagePlacer
    requests: list[PageRequest]


@asynccontextmanager
async def serving(
    guest: Guest,
    data: dict[str, npt.NDArray[np.uint8]],
    *,
    chunk: int = 512,
    received: ReceivedBitmap | None = None,
    one_page: bool = False,
) -> AsyncIterator[Served]:
    """Run a FaultHandler whose requests a fake source answers from ``data`` (one
    (pages, 4096) array per block): data pages as decoder-like record views, all-zero
    target pages as zero records, ``chunk`` records per placer call. With ``one_page``
    a one-page request is placed as an urgent page is (``place_page``, the handler told
    through ``on_page_placed``)."""
    received = received or guest.received
    send, receive = trio.open_memory_channel[PageRequest](float("inf"))
    requests: list[PageRequest] = []

    async def request_page(block: str, start: int, length: int) -> None:
        requests.append(PageRequest(block, start, length))
        send.send_nowait(PageRequest(block, start, length))

    handler = FaultHandler(guest.uffd, guest.blocks, received, request_page)
    placer = PagePlacer(
        guest.uffd,
        guest.blocks,
        received,
        on_placed=handler.pages_placed,
        on_page_placed=handler.page_placed if one_page else None,
    )

    async def source() -> None:
        async for request in receive:
            if one_page and request.length == PAGE:
                index = request.start // PAGE
                row = as_records(data[request.block][index : index + 1])[0]
                placer.place_page(request.block, request.start, row if row.any() else None)
                continue
            send_range(placer, data, request.block, request.start, request.length, chunk)

    async with trio.open_nursery() as nursery:
        await nursery.start(handler.run)
        nursery.start_soon(source)
        with trio.fail_after(TIMEOUT):
            yield Served(handler, placer, requests)
        nursery.cancel_scope.cancel()


def send_range(
    placer: PagePlacer,
    data: dict[str, npt.NDArray[np.uint8]],
    block: str,
    start: int,
    length: int,
    chunk: int,
    *,
    channel: int = 0,
) -> None:
    """Place ``[start, start+length)`` of ``block`` the way a decoder would hand it over:
    runs of data records and runs of zero records, at most ``chunk`` per call."""
    pages = data[block][start // PAGE : (start + length) // PAGE]
    offsets = np.arange(start, start + length, PAGE, dtype=np.uint64)
    zero = np.logical_not(pages.any(axis=1))
    boundaries = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
    for run in np.split(np.arange(len(offsets)), boundaries):
        for first in range(0, len(run), chunk):
            rows = run[first : first + chunk]
            if zero[rows[0]]:
                placer.place_zero(block, offsets[rows], channel=channel)
            else:
                placer.place(block, offsets[rows], as_records(pages[rows]), channel=channel)


# ------------------------------------------------------------------ 4 KiB blocks


@pytest.mark.parametrize("one_page", [False, True], ids=["runs", "one-page"])
async def test_faults_are_served_with_data_and_zero_pages(
    spawn_guest: Callable[..., Guest], one_page: bool
) -> None:
    guest = spawn_guest([("ram", 64 * PAGE, False), ("rom", 8 * PAGE, False)])
    ram = random_pages(64, 1)
    ram[10:20] = 0
    data = {"ram": ram, "rom": random_pages(8, 2)}
    async with serving(guest, data, one_page=one_page) as served:
        wanted = [0, 5, 10, 63]
        digests = await guest.digest("ram", [page * PAGE for page in wanted], PAGE)
        assert digests == [sha(ram[page]) for page in wanted]
        assert await guest.digest("rom", [2 * PAGE], PAGE) == [sha(data["rom"][2])]
        # Pages already placed do not fault again.
        assert await guest.digest("ram", [5 * PAGE], PAGE) == [sha(ram[5])]
        stats = served.handler.stats()
    assert served.requests == [
        *(PageRequest("ram", page * PAGE, PAGE) for page in wanted),
        PageRequest("rom", 2 * PAGE, PAGE),
    ]
    assert stats.requests == 5 and stats.outstanding == 0
    assert sum(stats.latency_dist) == 5 and len(stats.latency_dist) == LATENCY_BUCKETS
    assert stats.latency_ns > 0
    assert guest.received.block("ram").runs() == [(0, 1), (5, 1), (10, 1), (63, 1)]
    assert guest.received.block("rom").runs() == [(2, 1)]
    assert served.placer.stats.host_pages_placed == 5
    assert served.placer.stats.zero_host_pages == 1
    assert sha(bytes(PAGE)) == digests[2]


async def test_background_runs_need_no_faults(spawn_guest: Callable[..., Guest]) -> None:
    guest = spawn_guest([("ram", 1024 * PAGE, False)])
    ram = random_pages(1024, 3)
    ram[700:800] = 0
    async with serving(guest, {"ram": ram}) as served:
        placer = served.placer
        offsets = np.arange(0, 1024 * PAGE, PAGE, dtype=np.uint64)
        # Contiguous source rows: one ioctl for the run.
        assert placer.place("ram", offsets[:300], ram[:300]) == 300
        # Rows 4104 bytes apart (decoder layout), more than one staging buffer's worth.
        assert placer.place("ram", offsets[300:700], as_records(ram[300:700])) == 400
        assert placer.place_zero("ram", offsets[700:800]) == 100
        # Scattered, out of order, with duplicates: still one host page each.
        order = np.array([1023, 800, 801, 900, 899, 1023, 802], dtype=np.int64)
        assert placer.place("ram", offsets[order], as_records(ram[order])) == 6
        send_range(placer, {"ram": ram}, "ram", 803 * PAGE, 96 * PAGE, 40)
        send_range(placer, {"ram": ram}, "ram", 900 * PAGE, 123 * PAGE, 1000)
        assert guest.received.count("ram") == 1024
        digests = await guest.digest("ram", offsets.tolist(), PAGE)
        assert served.handler.stats().requests == 0
    assert digests == [sha(page) for page in ram]
    assert placer.stats.host_pages_placed == 1024
    assert placer.stats.zero_host_pages == 100
    assert placer.stats.skipped_received == 1  # page 900, sent twice
    assert placer.stats.already_present == 1  # page 1023, twice in one call


async def test_present_pages_are_skipped_eexist(spawn_guest: Callable[..., Guest]) -> None:
    guest = spawn_guest([("ram", 32 * PAGE, False)])
    old, new = random_pages(32, 4), random_pages(32, 5)
    async with serving(guest, {"ram": new}) as served:
        placer = served.placer
        offsets = np.arange(0, 32 * PAGE, PAGE, dtype=np.uint64)
        placer.place("ram", offsets[4:8], old[4:8])
        placer.place("ram", offsets[20:21], old[20:21])
        # Pretend the bitmap lost them (without freeing the memory): the kernel reports
        # EEXIST for them inside one run, the rest of the run is placed.
        guest.received.clear("ram", 4 * PAGE, 4 * PAGE)
        guest.received.clear("ram", 20 * PAGE)
        assert placer.place("ram", offsets[:24], new[:24]) == 19
        assert placer.stats.already_present == 5
        assert guest.received.block("ram").runs() == [(0, 24)]
        # Marked received: skipped without an ioctl.
        assert placer.place("ram", offsets[:2], new[:2]) == 0
        assert placer.place_zero("ram", offsets[2:3]) == 0
        assert placer.stats.skipped_received == 3
        digests = await guest.digest("ram", offsets[:24].tolist(), PAGE)
    expected = [sha(old[page] if page in (4, 5, 6, 7, 20) else new[page]) for page in range(24)]
    assert digests == expected
    assert served.handler.stats().requests == 0


async def test_discard_then_fault_again(spawn_guest: Callable[..., Guest]) -> None:
    guest = spawn_guest([("ram", 16 * PAGE, False)])
    first, second = random_pages(16, 6), random_pages(16, 7)
    data = {"ram": first}
    async with serving(guest, data) as served:
        assert await guest.digest("ram", [3 * PAGE], PAGE) == [sha(first[3])]
        served.placer.discard("ram", 3 * PAGE, PAGE)
        assert not guest.received.is_received("ram", 3 * PAGE)
        data["ram"] = second  # the source's newer copy
        assert await guest.digest("ram", [3 * PAGE], PAGE) == [sha(second[3])]
        with pytest.raises(RemoteProtocolError, match="not aligned"):
            served.placer.discard("ram", 100, PAGE)
        with pytest.raises(RemoteProtocolError, match="runs past the block's end"):
            served.placer.discard("ram", 15 * PAGE, 2 * PAGE)
    assert served.requests == [PageRequest("ram", 3 * PAGE, PAGE)] * 2


async def test_outstanding_requests_until_placed(spawn_guest: Callable[..., Guest]) -> None:
    guest = spawn_guest([("ram", 8 * PAGE, False)])
    data = random_pages(8, 8)
    asked = trio.Event()

    async def request_page(block: str, start: int, length: int) -> None:
        asked.set()  # ... and the return path is down: nothing is sent

    handler = FaultHandler(guest.uffd, guest.blocks, guest.received, request_page)
    placer = PagePlacer(guest.uffd, guest.blocks, guest.received, on_placed=handler.pages_placed)
    digests: list[str] = []

    async def read() -> None:
        digests.extend(await guest.digest("ram", [5 * PAGE], PAGE))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(handler.run)
            nursery.start_soon(read)
            await asked.wait()
            assert handler.outstanding() == [PageRequest("ram", 5 * PAGE, PAGE)]
            await trio.sleep(0.01)
            assert handler.stats().blocktime_ms >= 10  # still blocked
            # After a recovery the owner re-sends the outstanding requests; here the
            # page simply arrives.
            placer.place("ram", [5 * PAGE], data[5:6])
            assert handler.outstanding() == []
            while not digests:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert digests == [sha(data[5])]
    stats = handler.stats()
    assert stats.blocktime_ms >= 10 and stats.latency_ns >= 10_000_000


async def test_blocking_uffd_from_the_guest_still_works(
    spawn_guest: Callable[..., Guest],
) -> None:
    # Polling a blocking userfaultfd reports an error; the handler switches it.
    guest = spawn_guest([("ram", 4 * PAGE, False)], blocking_uffd=True)
    data = {"ram": random_pages(4, 9)}
    async with serving(guest, data):
        assert await guest.digest("ram", [PAGE, 3 * PAGE], PAGE) == [
            sha(data["ram"][1]),
            sha(data["ram"][3]),
        ]


async def test_fault_outside_every_block_is_a_guest_error(
    spawn_guest: Callable[..., Guest],
) -> None:
    guest = spawn_guest([("a", 4 * PAGE, False), ("b", 4 * PAGE, False)])
    known = [block for block in guest.blocks if block.name == "a"]

    async def request_page(block: str, start: int, length: int) -> None:
        raise AssertionError("no request expected")

    handler = FaultHandler(guest.uffd, known, ReceivedBitmap(known), request_page)
    with trio.fail_after(TIMEOUT), pytest.raises(GuestError, match="outside every registered"):
        async with open_nursery() as nursery:
            await nursery.start(handler.run)
            nursery.start_soon(guest.digest, "b", [0], PAGE)
    # (the child stays blocked on the fault until the fixture closes the uffd)


def test_bad_placement_input_is_refused(spawn_guest: Callable[..., Guest]) -> None:
    guest = spawn_guest([("ram", 4 * PAGE, False)])
    placer = PagePlacer(guest.uffd, guest.blocks, guest.received)
    page = np.zeros((1, PAGE), dtype=np.uint8)
    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'nope'"):
        placer.place("nope", [0], page)
    with pytest.raises(RemoteProtocolError, match="Illegal RAM offset 0x4000 for RAM block 'ram'"):
        placer.place("ram", [4 * PAGE], page)
    with pytest.raises(RemoteProtocolError, match="Illegal RAM offset 0x10"):
        placer.place_zero("ram", [16])
    with pytest.raises(ValueError, match="shape"):
        placer.place("ram", [0, PAGE], page)
    with pytest.raises(ValueError, match="channel 2 out of range"):
        placer.place("ram", [0], page, channel=2)
    # The one-page path refuses the same input with the same errors.
    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'nope'"):
        placer.place_page("nope", 0, page[0])
    with pytest.raises(RemoteProtocolError, match="Illegal RAM offset 0x4000 for RAM block 'ram'"):
        placer.place_page("ram", 4 * PAGE, page[0])
    with pytest.raises(RemoteProtocolError, match="Illegal RAM offset 0x10"):
        placer.place_page("ram", 16, None)
    with pytest.raises(ValueError, match="shape"):
        placer.place_page("ram", 0, page[0, :100])
    with pytest.raises(ValueError, match="channel 2 out of range"):
        placer.place_page("ram", 0, page[0], channel=2)
    assert guest.received.count() == 0


# ---------------------------------------------------------------- hugetlb blocks


async def test_hugetlb_host_pages_are_gathered_and_placed_whole(
    hugepages: int, spawn_guest: Callable[..., Guest]
) -> None:
    guest = spawn_guest([("huge", 4 * HUGE, True), ("ram", 16 * PAGE, False)])
    per_host = HUGE // PAGE
    huge = random_pages(4 * per_host, 10)
    huge[:per_host:3] = 0  # host page 0: mixed zero and data target pages
    huge[2 * per_host :] = 0  # host pages 2 and 3: all zero
    data = {"huge": huge, "ram": random_pages(16, 11)}
    async with serving(guest, data, chunk=100) as served:
        placer = served.placer
        # Host page 3 arrives in the background, all zero records: nothing is placed
        # until the last of its 512 target pages arrives.
        offsets = np.arange(3 * HUGE, 4 * HUGE, PAGE, dtype=np.uint64)
        assert placer.place_zero("huge", offsets[:-1]) == 0
        assert placer.gathering(0) == ("huge", 3 * HUGE)
        assert guest.received.count("huge") == 0
        assert placer.place_zero("huge", offsets[-1:]) == 1
        assert placer.gathering(0) is None
        digests = await guest.digest("huge", [0, HUGE, 2 * HUGE, 3 * HUGE], HUGE)
        assert await guest.digest("ram", [PAGE], PAGE) == [sha(data["ram"][1])]
        stats = served.handler.stats()
    assert digests == [sha(huge[i * per_host : (i + 1) * per_host]) for i in range(4)]
    assert digests[2] == digests[3] == sha(bytes(HUGE))
    assert served.requests == [
        PageRequest("huge", 0, HUGE),
        PageRequest("huge", HUGE, HUGE),
        PageRequest("huge", 2 * HUGE, HUGE),
        PageRequest("ram", PAGE, PAGE),
    ]
    assert stats.requests == 4 and sum(stats.latency_dist) == 4
    assert guest.received.count("huge") == 4 * per_host
    assert placer.stats.host_pages_placed == 5  # 4 huge + 1 small
    assert placer.stats.zero_host_pages == 2


async def test_hugetlb_fault_inside_a_huge_page_requests_the_whole_page(
    hugepages: int, spawn_guest: Callable[..., Guest]
) -> None:
    guest = spawn_guest([("huge", 2 * HUGE, True)])
    huge = random_pages(2 * HUGE // PAGE, 12)
    async with serving(guest, {"huge": huge}) as served:
        offset = HUGE + 77 * PAGE
        assert await guest.digest("huge", [offset], PAGE) == [sha(huge[offset // PAGE])]
    assert served.requests == [PageRequest("huge", HUGE, HUGE)]


def test_non_same_host_page_is_a_protocol_error(
    hugepages: int, spawn_guest: Callable[..., Guest]
) -> None:
    guest = spawn_guest([("huge", 2 * HUGE, True)])
    placer = PagePlacer(guest.uffd, guest.blocks, guest.received)
    huge = random_pages(2 * HUGE // PAGE, 13)
    data = {"huge": huge}
    offsets = np.arange(0, 2 * HUGE, PAGE, dtype=np.uint64)
    placer.place("huge", offsets[:10], huge[:10])
    with pytest.raises(
        RemoteProtocolError,
        match=r"Non-same host page detected on channel 0: gathering RAM block 'huge' host "
        r"page 0x0 \(10 of 512 target pages\), received RAM block 'huge' offset 0x200000",
    ):
        placer.place("huge", offsets[512:513], huge[512:513])
    # Inside one call too: the error names the first foreign record.
    with pytest.raises(RemoteProtocolError, match="offset 0x201000"):
        placer.place("huge", offsets[[10, 11, 513]], huge[[10, 11, 513]])
    # The other channel gathers its own host page meanwhile.
    send_range(placer, data, "huge", HUGE, HUGE, 64, channel=PREEMPT_CHANNEL)
    assert guest.received.block("huge").runs() == [(512, 512)]
    assert placer.gathering(0) == ("huge", 0)
    # A pause drops the half-gathered page; it is sent again in full afterwards.
    placer.reset_channel(0)
    assert placer.gathering(0) is None
    assert guest.received.count("huge") == 512
    send_range(placer, data, "huge", 0, HUGE, 300)
    assert guest.received.count("huge") == 1024
    assert placer.stats.host_pages_placed == 2


async def test_hugetlb_discard_then_fault_again(
    hugepages: int, spawn_guest: Callable[..., Guest]
) -> None:
    guest = spawn_guest([("huge", 2 * HUGE, True)])
    first = random_pages(2 * HUGE // PAGE, 14)
    data = {"huge": first}
    async with serving(guest, data) as served:
        assert await guest.digest("huge", [HUGE], HUGE) == [sha(first[512:])]
        with pytest.raises(RemoteProtocolError, match="not aligned to the block's page size"):
            served.placer.discard("huge", HUGE, PAGE)
        served.placer.discard("huge", HUGE, HUGE)
        assert guest.received.count("huge") == 0
        data["huge"] = second = random_pages(2 * HUGE // PAGE, 15)
        assert await guest.digest("huge", [HUGE], HUGE) == [sha(second[512:])]
    assert served.requests == [PageRequest("huge", HUGE, HUGE)] * 2


# ------------------------------------------------ a placement racing a fault


class _PlacedDuringTheCheck(ReceivedBitmap):
    """A received bitmap whose next ``is_received`` (the fault handler's check of a
    fault) runs ``during`` in another thread before it answers: the placement lands
    between the handler's check and its recording of the request, as it can when the
    main listener's thread takes the GIL there. The thread runs until it ends or it
    waits for the handler (at most PLACEMENT_WAIT once the page is placed)."""

    PLACEMENT_WAIT = 0.5

    def __init__(self, blocks: Sequence[GuestRamBlock]) -> None:
        super().__init__(blocks)
        #: (place, block, start, size): placing [start, start+size) of block, once.
        self.during: tuple[Callable[[], None], str, int, int] | None = None
        self.threads: list[threading.Thread] = []

    def is_received(self, name: str, offset: int, length: int = PAGE) -> bool:
        answer = super().is_received(name, offset, length)
        if self.during is not None:
            (place, block, start, size), self.during = self.during, None
            thread = threading.Thread(target=place)
            self.threads.append(thread)
            thread.start()
            deadline = time.monotonic() + TIMEOUT
            while not self.block(block).all_set(start // PAGE, size // PAGE):
                assert thread.is_alive() and time.monotonic() < deadline, "nothing was placed"
                time.sleep(0.001)
            thread.join(self.PLACEMENT_WAIT)
        return answer


@pytest.mark.parametrize("hugetlb", [False, True], ids=["4k", "hugetlb"])
async def test_page_placed_while_its_fault_is_noted_completes_the_request(
    request: pytest.FixtureRequest, spawn_guest: Callable[..., Guest], hugetlb: bool
) -> None:
    """The campaign's "the source ended postcopy without 1 requested page(s)": the guest
    faults on a page the background stream is placing; the fault handler finds it not
    received yet, the placer then marks it received and reports it before the handler
    has recorded the request. The request must still complete: the source sends the
    page only once (it is clean there), so nothing else would ever complete it."""
    if hugetlb:
        request.getfixturevalue("hugepages")
    size = HUGE if hugetlb else PAGE
    guest = spawn_guest([("b", 3 * size, hugetlb)])
    received = _PlacedDuringTheCheck(guest.blocks)
    pages = random_pages(3 * size // PAGE, 21)
    handler = FaultHandler(guest.uffd, guest.blocks, received, _no_request)
    placer = PagePlacer(guest.uffd, guest.blocks, received, on_placed=handler.pages_placed)
    start = size  # host page 1; the guest reads a target page inside it
    read_at = start + (5 * PAGE if hugetlb else 0)
    received.during = (
        lambda: send_range(placer, {"b": pages}, "b", start, size, 512),
        "b",
        start,
        size,
    )
    digests: list[str] = []

    async def read() -> None:
        digests.extend(await guest.digest("b", [read_at], PAGE))

    with trio.fail_after(TIMEOUT):
        async with open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.lowlevel.wait_readable(guest.uffd.fileno())
            faults = guest.uffd.read_faults()
            assert [fault.address // size for fault in faults] == [
                (guest.blocks[0].address + read_at) // size
            ]
            handler.note_fault(faults[0])  # the placement lands inside it
            for thread in received.threads:
                await trio.to_thread.run_sync(thread.join, TIMEOUT)
            assert not any(thread.is_alive() for thread in received.threads)
            assert handler.outstanding() == []
            while not digests:
                await trio.sleep(0.001)
    assert digests == [sha(pages[read_at // PAGE])]
    stats = handler.stats()
    assert stats.outstanding == 0 and placer.stats.host_pages_placed == 1


async def _no_request(block: str, start: int, length: int) -> None:
    raise AssertionError("note_fault is called directly here")


async def test_pages_found_present_are_reported_too(spawn_guest: Callable[..., Guest]) -> None:
    """Every page a call marks received goes to on_placed after its bit is set, also when
    the kernel found it present (EEXIST, e.g. placed by another channel's thread that has
    not set its bits yet): a request recorded in between completes either way."""
    guest = spawn_guest([("ram", 8 * PAGE, False)])
    reported: list[list[int]] = []
    placer = PagePlacer(
        guest.uffd,
        guest.blocks,
        guest.received,
        on_placed=lambda block, offsets: reported.append(offsets.tolist()),
    )
    pages = random_pages(8, 31)
    offsets = np.arange(0, 8 * PAGE, PAGE, dtype=np.uint64)
    placer.place("ram", offsets[2:3], pages[2:3])  # one page (the urgent path)
    placer.place("ram", offsets[4:7], as_records(pages[4:7]))  # a run
    assert reported == [[2 * PAGE], [4 * PAGE, 5 * PAGE, 6 * PAGE]]
    guest.received.clear("ram", 2 * PAGE)
    guest.received.clear("ram", 4 * PAGE, 3 * PAGE)
    reported.clear()
    assert placer.place("ram", offsets[2:3], pages[2:3], channel=PREEMPT_CHANNEL) == 0
    assert placer.place_zero("ram", offsets[4:7]) == 0
    assert reported == [[2 * PAGE], [4 * PAGE, 5 * PAGE, 6 * PAGE]]
    assert placer.stats.already_present == 4
    assert guest.received.block("ram").runs() == [(2, 1), (4, 3)]
