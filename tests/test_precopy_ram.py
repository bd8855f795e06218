"""The precopy page path on both sides: the source's zero check and queue_window gather
arrays, the destination's page copy (pwritev into fresh memfd holes, the mapping for
allocated pages). Real memfds and a real socket."""

from __future__ import annotations

import os

import numpy as np
import pytest
import trio

from trimig import codec
from trimig.channel import MigrationChannel
from trimig.kernel.memory import MADV_POPULATE_WRITE
from trimig.loadvm.ram_loader import RamLoader
from trimig.migration import SourceStats
from trimig.ram_blocks import RamBlock, RamBlockSpec, create_blocks
from trimig.savevm.ram_saver import WINDOW_PAGES, RamSaver, zero_pages
from trimig.transports import MemoryFabric, SocketStream, connect, listen

PAGE = 4096


@pytest.fixture
def pages() -> np.ndarray:
    """16 pages: even ones zero; odd ones non-zero, some only past their first 64 bytes."""
    array = np.zeros((16, PAGE), dtype=np.uint8)
    array[1, 0] = 1
    array[3, PAGE - 1] = 7  # first cache line zero, last byte not
    array[5, 64] = 1
    array[7, 63] = 1
    array[9:16:2, 2000] = 3
    return array


EXPECTED_ZERO = np.arange(16) % 2 == 0


@pytest.mark.parametrize(
    "index",
    [np.arange(16), np.arange(4, 12), np.array([0, 3, 4, 9, 15]), np.array([3]), np.array([2])],
)
def test_zero_pages_reads_past_the_first_line(pages: np.ndarray, index: np.ndarray) -> None:
    assert zero_pages(pages, index).tolist() == EXPECTED_ZERO[index].tolist()


def test_zero_pages_whole_runs() -> None:
    zero = np.zeros((WINDOW_PAGES, PAGE), dtype=np.uint8)
    assert zero_pages(zero, np.arange(WINDOW_PAGES)).all()
    zero[100, 4000] = 1  # every first line zero, one page not
    result = zero_pages(zero, np.arange(WINDOW_PAGES))
    assert np.flatnonzero(~result).tolist() == [100]
    assert zero_pages(zero, np.array([], dtype=np.int64)).shape == (0,)


def page_event(block: str, first: int, data: np.ndarray) -> codec.RamPages:
    offsets = (np.arange(len(data), dtype=np.uint64) + np.uint64(first)) * np.uint64(PAGE)
    return codec.RamPages(block, offsets, data)


def loader_for(blocks: list[RamBlock]) -> RamLoader:
    loader = RamLoader(blocks)
    infos = tuple(codec.RamBlockInfo(b.name, b.size, None) for b in blocks)
    loader.check_mem_size(codec.RamMemSize(sum(b.size for b in blocks), infos), postcopy=False)
    return loader


def allocated_pages(fd: int, size: int) -> int:
    """Pages of the memfd that hold data (SEEK_DATA/SEEK_HOLE walk)."""
    total, offset = 0, 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        total += (end - start) // PAGE
        offset = end
    return total


def test_load_pages_into_holes_then_over_allocated_pages() -> None:
    (block,) = create_blocks([RamBlockSpec("pc.ram", 64 * PAGE)])
    try:
        loader = loader_for([block])
        rng = np.random.default_rng(5)
        records = rng.integers(0, 256, (20, PAGE + 8), dtype=np.uint8)
        first = records[:, 8:]  # strided rows, as a decoder hands them out
        loader.load_pages(page_event("pc.ram", 10, first))  # fresh holes: written as a file
        assert allocated_pages(block.fd, block.size) == 20
        assert np.array_equal(block.pages[10:30], first)
        second = rng.integers(0, 256, (25, PAGE), dtype=np.uint8)
        loader.load_pages(page_event("pc.ram", 5, second))  # part holes, part data
        assert np.array_equal(block.pages[5:30], second)
        third = rng.integers(0, 256, (10, PAGE), dtype=np.uint8)
        loader.load_pages(page_event("pc.ram", 12, third))  # all allocated: the mapping
        assert np.array_equal(block.pages[12:22], third)
        scattered = codec.RamPages(
            "pc.ram", np.array([40 * PAGE, 2 * PAGE], dtype=np.uint64), third[:2]
        )
        loader.load_pages(scattered)
        assert np.array_equal(block.pages[[40, 2]], third[:2])
        assert np.flatnonzero(loader.written["pc.ram"]).tolist() == [2, *range(5, 30), 40]
    finally:
        block.close()


async def test_windows_round_trip_through_a_socket() -> None:
    """queue_window's gather arrays decode to the source's pages; zero pages become ZERO."""
    specs = [RamBlockSpec("a", 3 * WINDOW_PAGES * PAGE), RamBlockSpec("b", 64 * PAGE)]
    source = create_blocks(specs)
    destination = create_blocks(specs)
    try:
        rng = np.random.default_rng(6)
        a = source[0]
        a.mapping.madvise(MADV_POPULATE_WRITE, 0, WINDOW_PAGES * PAGE)  # allocated zeros
        a.pages[WINDOW_PAGES : 2 * WINDOW_PAGES] = rng.integers(0, 256, (WINDOW_PAGES, PAGE))
        a.pages[WINDOW_PAGES + 7] = 0
        a.pages[2 * WINDOW_PAGES + 3, 3000] = 9  # the rest of the third window: holes
        source[1].pages[::3] = rng.integers(0, 256, (22, PAGE))
        saver = RamSaver(source, SourceStats())
        left, right = trio.socket.socketpair()
        sender = MigrationChannel(SocketStream(left, transport="unix", peer="pair"))
        receiver = MigrationChannel(SocketStream(right, transport="unix", peer="pair"))
        decoder = codec.RamChannelDecoder({s.name: s.size for s in specs})
        loader = loader_for(destination)

        async def send() -> None:
            while (window := saver.next_dirty_window()) is not None:
                saver.queue_window(sender, *window)
                await sender.flush()
            sender.put(codec.encode_end_of_section())
            await sender.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                event = decoder.next_event()
                if event is codec.NEED_DATA:
                    if not await receiver.receive_into_decoder(decoder):
                        decoder.receive_eof()
                    continue
                if isinstance(event, codec.RamPages):
                    loader.load_pages(event)
                elif isinstance(event, codec.RamZeroPages):
                    loader.load_zero_pages(event)
                else:
                    break
        await sender.aclose()
        await receiver.aclose()
        for mine, theirs in zip(source, destination, strict=True):
            assert np.array_equal(mine.pages, theirs.pages)
        data_pages = WINDOW_PAGES - 1 + 1 + 22
        assert saver.stats.normal == data_pages
        assert saver.stats.duplicate == len(a.pages) + len(source[1].pages) - data_pages
        assert not any(bitmap.any() for bitmap in saver.dirty.values())
    finally:
        for block in source + destination:
            block.close()


@pytest.mark.parametrize("flavour", ["mem", "path"])
async def test_one_sided_writes_on_the_rdma_transport(flavour: str, tmp_path: object) -> None:
    """With attached regions, data pages land in the destination's memory directly and only
    HOOK and ZERO records travel on the stream."""
    specs = [RamBlockSpec("a", 2 * WINDOW_PAGES * PAGE), RamBlockSpec("b", 64 * PAGE)]
    source = create_blocks(specs)
    destination = create_blocks(specs)
    fabric = MemoryFabric() if flavour == "mem" else None
    uri = "rdma:mem:one-sided" if flavour == "mem" else f"rdma:{tmp_path}/rdma"
    try:
        rng = np.random.default_rng(7)
        a = source[0]
        a.pages[:300] = rng.integers(0, 256, (300, PAGE))
        a.pages[100:110] = 0  # zero pages inside the data: two runs
        a.pages[WINDOW_PAGES + 5 :: 7] = rng.integers(0, 256, (73, PAGE))
        source[1].pages[3] = 1
        destination[0].pages[100] = 5  # stale data a ZERO record must clear
        saver = RamSaver(source, SourceStats())
        try:
            await one_sided_round_trip(saver, uri, fabric, specs, destination)
        finally:
            saver.detach_regions()  # drop the views of the destination's memory
        for mine, theirs in zip(source, destination, strict=True):
            assert np.array_equal(mine.pages, theirs.pages)
        assert saver.stats.normal == 290 + 73 + 1
    finally:
        for block in source + destination:
            block.close()


async def one_sided_round_trip(
    saver: RamSaver,
    uri: str,
    fabric: MemoryFabric | None,
    specs: list[RamBlockSpec],
    destination: list[RamBlock],
) -> None:
    """Attach the destination's registered blocks, send every window, apply the records."""
    async with await listen(uri, fabric=fabric) as listener:
        client = await connect(uri, fabric=fabric)
        server = await listener.accept()
        sender = MigrationChannel(client)
        receiver = MigrationChannel(server)
        try:
            loader = loader_for(destination)
            loader.written["a"][100] = True
            assert server.regions is not None and client.regions is not None
            for block in destination:
                await server.regions.register(
                    block.name, block.fd, block.size, block.mapping.buffer
                )
            await saver.attach_regions(client.regions)
            decoder = codec.RamChannelDecoder({s.name: s.size for s in specs})
            while (window := saver.next_dirty_window()) is not None:
                saver.queue_window(sender, *window)
            sender.put(codec.encode_end_of_section())
            await sender.flush()
            kinds = set()
            while True:
                event = decoder.next_event()
                if event is codec.NEED_DATA:
                    assert await receiver.receive_into_decoder(decoder)
                    continue
                kinds.add(type(event).__name__)
                if isinstance(event, codec.RamWritten):
                    loader.pages_written_remotely(event)
                elif isinstance(event, codec.RamZeroPages):
                    loader.load_zero_pages(event)
                else:
                    break
        finally:
            await sender.aclose()
            await receiver.aclose()
    assert kinds == {"RamWritten", "RamZeroPages", "RamEndOfSection"}
    assert sender.bytes_sent < 64 * PAGE  # records only, no page payloads
    assert np.flatnonzero(loader.written["b"]).tolist() == [3]


def test_load_pages_in_any_order() -> None:
    """A run whose offsets span as many pages as it has but are not in order (valid on the
    wire) lands page by page, not as a slice."""
    (block,) = create_blocks([RamBlockSpec("pc.ram", 16 * PAGE)])
    try:
        loader = loader_for([block])
        data = np.random.default_rng(8).integers(0, 256, (3, PAGE), dtype=np.uint8)
        offsets = np.array([5 * PAGE, 4 * PAGE, 7 * PAGE], dtype=np.uint64)
        loader.load_pages(codec.RamPages("pc.ram", offsets, data))
        assert np.array_equal(block.pages[[5, 4, 7]], data)
        assert not block.pages[6].any()
        assert np.flatnonzero(loader.written["pc.ram"]).tolist() == [4, 5, 7]
    finally:
        block.close()


@pytest.mark.usefixtures("hugepages")
def test_zero_record_inside_a_written_huge_page_zeroes_that_page_only() -> None:
    """A ZERO for a 4 KiB page of a huge page we wrote must zero just it (a hole can only
    be a whole huge page); the rest of the huge page keeps its data."""
    huge = 2 << 20
    (block,) = create_blocks([RamBlockSpec("pc.huge", 2 * huge, huge)])
    try:
        loader = loader_for([block])
        data = np.random.default_rng(8).integers(1, 256, (1024, PAGE), dtype=np.uint8)
        loader.load_pages(page_event("pc.huge", 0, data))
        zeros = np.array([3 * PAGE, 700 * PAGE], dtype=np.uint64)
        loader.load_zero_pages(codec.RamZeroPages("pc.huge", zeros))
        assert not block.pages[[3, 700]].any()
        expected = data.copy()
        expected[[3, 700]] = 0
        assert np.array_equal(block.pages[:1024], expected)
    finally:
        block.close()
