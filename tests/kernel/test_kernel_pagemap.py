"""WP_ASYNC dirty tracking with PAGEMAP_SCAN, end to end on the real kernel."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from trimig.errors import ConfigError, KernelError
from trimig.kernel import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    Feature,
    Mapping,
    Mode,
    PagemapScanner,
    Userfaultfd,
)
from trimig.kernel.pagemap import VECTOR_LENGTH, merge_adjacent

P = PAGE_SIZE


def pages(ranges: np.ndarray, base: int, page_size: int = P) -> list[tuple[int, int]]:
    """Ranges as (first page, end page) pairs relative to ``base``."""
    assert ranges.dtype == np.uint64 and ranges.ndim == 2 and ranges.shape[1] == 2
    return [((int(s) - base) // page_size, (int(e) - base) // page_size) for s, e in ranges]


class Tracked:
    """A memfd mapping of ours registered for WP_ASYNC tracking and write-protected."""

    def __init__(self, fd: int, size: int, *, protect_with_scanner: bool = False) -> None:
        self.mapping = Mapping(fd, size)
        self.uffd = Userfaultfd.create()
        self.uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM)
        self.uffd.register(self.mapping.address, size, Mode.WP)
        self.scanner = PagemapScanner(os.getpid())
        self.start = self.mapping.address
        self.end = self.start + size
        if protect_with_scanner:
            self.scanner.protect(self.start, self.end)
        else:
            self.uffd.writeprotect(self.start, size, protect=True)

    def take(self, page_size: int = P) -> list[tuple[int, int]]:
        return pages(self.scanner.take_written(self.start, self.end), self.start, page_size)

    def peek(self, page_size: int = P) -> list[tuple[int, int]]:
        return pages(self.scanner.written(self.start, self.end), self.start, page_size)

    def close(self) -> None:
        self.scanner.close()
        self.uffd.close()
        self.mapping.close()


@pytest.fixture
def track(memfd_factory: Callable[..., int]) -> Iterator[Callable[..., Tracked]]:
    made: list[Tracked] = []

    def make(size: int, *, hugetlb: bool = False, protect_with_scanner: bool = False) -> Tracked:
        tracked = Tracked(
            memfd_factory(size, hugetlb=hugetlb), size, protect_with_scanner=protect_with_scanner
        )
        made.append(tracked)
        return tracked

    yield make
    for tracked in made:
        tracked.close()


@pytest.mark.parametrize("protect_with_scanner", [False, True])
def test_take_written_reports_exactly_the_written_pages(
    track: Callable[..., Tracked], protect_with_scanner: bool
) -> None:
    tracked = track(64 * P, protect_with_scanner=protect_with_scanner)
    buffer = tracked.mapping.buffer
    buffer[P] = 1  # populate one page before the first scan: it must not matter
    assert tracked.take() in ([(1, 2)], [])
    assert tracked.take() == []
    for page in (3, 4, 10, 63):
        buffer[page * P + 17] = page
    assert tracked.peek() == [(3, 5), (10, 11), (63, 64)]
    assert tracked.peek() == [(3, 5), (10, 11), (63, 64)]  # read-only: still there
    assert tracked.take() == [(3, 5), (10, 11), (63, 64)]
    assert tracked.take() == []
    buffer[4 * P] = 9
    buffer[20 * P : 22 * P] = b"\x01" * (2 * P)
    assert tracked.take() == [(4, 5), (20, 22)]
    assert tracked.take() == []
    _ = bytes(buffer[30 * P : 40 * P])  # reading is not writing
    assert tracked.take() == []


def test_registration_alone_reports_populated_pages_as_written(
    memfd_factory: Callable[..., int],
) -> None:
    """Why callers must write-protect after registering: a fresh registration protects
    nothing, so every populated page counts as written."""
    fd = memfd_factory(8 * P)
    with (
        Mapping(fd, 8 * P) as mapping,
        Userfaultfd.create() as uffd,
        PagemapScanner("self") as scanner,
    ):
        mapping.buffer[2 * P] = 1
        uffd.api(Feature.WP_ASYNC)
        uffd.register(mapping.address, 8 * P, Mode.WP)
        written = pages(
            scanner.take_written(mapping.address, mapping.address + 8 * P), mapping.address
        )
        assert (2, 3) in [(s, e) for s, e in written if s <= 2 < e] or written == [(0, 8)]
        del written
        mapping.buffer[5 * P] = 1
        assert pages(
            scanner.take_written(mapping.address, mapping.address + 8 * P), mapping.address
        ) == [(5, 6)]


def test_sub_range_scans(track: Callable[..., Tracked]) -> None:
    tracked = track(32 * P)
    buffer = tracked.mapping.buffer
    for page in (1, 9, 17, 25):
        buffer[page * P] = 1
    middle = tracked.scanner.take_written(tracked.start + 8 * P, tracked.start + 24 * P)
    assert pages(middle, tracked.start) == [(9, 10), (17, 18)]
    assert tracked.take() == [(1, 2), (25, 26)]


@pytest.mark.parametrize("count", [VECTOR_LENGTH - 1, VECTOR_LENGTH, VECTOR_LENGTH + 904])
def test_more_ranges_than_the_output_vector(track: Callable[..., Tracked], count: int) -> None:
    """Around and past a full output vector (a second ioctl). The kernel also restarts
    internally every 512 ranges, which leaves a stale walk_end behind."""
    tracked = track(2 * count * P)
    array = np.frombuffer(tracked.mapping.buffer, dtype=np.uint8).reshape(-1, P)
    array[0::2, 0] = 1  # every other page
    del array
    expected = [(2 * i, 2 * i + 1) for i in range(count)]
    assert tracked.peek() == expected
    assert tracked.take() == expected
    assert tracked.take() == []


@pytest.mark.parametrize("count", [3, VECTOR_LENGTH + 904])
def test_written_and_present_in_one_walk(track: Callable[..., Tracked], count: int) -> None:
    """The last sync's scan: the same written and present ranges as the two read-only
    scans, also past a full output vector; it protects nothing again."""
    tracked = track(4 * count * P)
    array = np.frombuffer(tracked.mapping.buffer, dtype=np.uint8).reshape(-1, P)
    array[0::4, 0] = 1  # written
    _ = int(array[1::4, 0].sum())  # present, not written
    del array
    written, present = tracked.scanner.written_and_present(tracked.start, tracked.end)
    assert pages(written, tracked.start) == tracked.peek()
    assert pages(written, tracked.start)[:3] == [(0, 1), (4, 5), (8, 9)]
    alone = tracked.scanner.present(tracked.start, tracked.end)
    assert pages(present, tracked.start) == pages(alone, tracked.start)
    covered = {page for first, end in pages(present, tracked.start) for page in range(first, end)}
    assert {4 * i for i in range(count)} | {4 * i + 1 for i in range(count)} <= covered
    assert written.flags.c_contiguous and present.flags.c_contiguous
    assert len(tracked.take()) == count  # still written: the walk protected nothing


def test_hugetlb_tracking(hugepages: Any, track: Callable[..., Tracked]) -> None:
    tracked = track(4 * HUGE_PAGE_SIZE, hugetlb=True)
    buffer = tracked.mapping.buffer
    assert tracked.take(HUGE_PAGE_SIZE) == []
    buffer[HUGE_PAGE_SIZE + 4096 * 7] = 1
    buffer[3 * HUGE_PAGE_SIZE] = 1
    assert tracked.take(HUGE_PAGE_SIZE) == [(1, 2), (3, 4)]
    assert tracked.take(HUGE_PAGE_SIZE) == []
    buffer[3 * HUGE_PAGE_SIZE + 100] = 2
    assert tracked.take(HUGE_PAGE_SIZE) == [(3, 4)]


def test_cross_process_tracking(
    memfd_factory: Callable[..., int], spawn_child: Callable[..., Any]
) -> None:
    """The child registers and sends its uffd; we protect its memory through that uffd
    and scan /proc/CHILD/pagemap while it writes."""
    size = 16 * P
    child = spawn_child(memfd_factory(size), size, "wp")
    start, end = child.address, child.address + size
    child.uffd.writeprotect(start, size, protect=True)  # acts on the child's memory
    with PagemapScanner(child.pid) as scanner:
        assert pages(scanner.take_written(start, end), start) == []
        assert child.request({"op": "write", "offsets": [P, 2 * P + 5, 7 * P], "value": 1}) == {
            "ok": True
        }
        assert pages(scanner.take_written(start, end), start) == [(1, 3), (7, 8)]
        assert pages(scanner.take_written(start, end), start) == []
        assert child.request({"op": "read", "offsets": [P, 9 * P]}) == {"values": [1, 0]}
        assert pages(scanner.take_written(start, end), start) == []
        child.request({"op": "write", "offsets": [2 * P, 9 * P], "value": 2})
        assert pages(scanner.written(start, end), start) == [(2, 3), (9, 10)]
        assert pages(scanner.take_written(start, end), start) == [(2, 3), (9, 10)]
        assert pages(scanner.take_written(start, end), start) == []


def test_unregistered_memory_is_refused(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    with Mapping(fd, 4 * P) as mapping, PagemapScanner(os.getpid()) as scanner:
        mapping.buffer[0] = 1
        with pytest.raises(KernelError, match="WP_ASYNC") as info:
            scanner.take_written(mapping.address, mapping.address + 4 * P)
        assert info.value.errno == errno.EPERM
        with pytest.raises(KernelError):
            scanner.written(mapping.address, mapping.address + 4 * P)
        with pytest.raises(ConfigError, match="page-aligned"):
            scanner.take_written(mapping.address + 1, mapping.address + 4 * P)
        with pytest.raises(ConfigError):
            scanner.take_written(mapping.address, mapping.address)
    with pytest.raises(ValueError, match="closed"):
        scanner.written(mapping.address, mapping.address + P)


def test_scanner_of_a_missing_process() -> None:
    with pytest.raises(KernelError) as info:
        PagemapScanner(2**22 + 12345)
    assert info.value.errno == errno.ENOENT


def testmerge_adjacent() -> None:
    ranges = np.array([[0, 4], [4, 8], [12, 16], [16, 20], [20, 24], [30, 31]], np.uint64)
    assert merge_adjacent(ranges).tolist() == [[0, 8], [12, 24], [30, 31]]
    disjoint = np.array([[0, 4], [5, 8]], np.uint64)
    assert merge_adjacent(disjoint).tolist() == [[0, 4], [5, 8]]
