"""UrgentSender: what a page request puts on a channel (the bytes decoded back)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import trio

from trimig import codec
from trimig.channel import MigrationChannel
from trimig.errors import LocalProtocolError
from trimig.migration import SourceStats
from trimig.postcopy import PageRequest
from trimig.ram_blocks import RamBlockSpec, create_blocks
from trimig.savevm.postcopy import UrgentSender
from trimig.savevm.ram_saver import RamSaver
from trimig.transports.socket import SocketStream

PAGE = 4096
MIB = 1 << 20


class Recorder:
    """A ByteStream that keeps the bytes sent (this test checks what is encoded)."""

    transport = "test"
    has_return_path = False
    regions = None

    def __init__(self) -> None:
        self.data = bytearray()

    async def send_buffers(self, buffers: Sequence[Any]) -> None:
        for buffer in buffers:
            self.data += bytes(buffer)

    async def receive_into(self, buffer: memoryview) -> int:
        return 0

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def decoded(data: bytes, size: int) -> list[tuple[str, int, bytes | None]]:
    decoder = codec.RamChannelDecoder({"pc.ram": size})
    decoder.receive_data(data)
    items: list[tuple[str, int, bytes | None]] = []
    while (event := decoder.next_event()) is not codec.NEED_DATA:
        if isinstance(event, codec.RamPages):
            pages = zip(event.offsets, event.pages, strict=True)
            items += [("page", int(offset), bytes(page)) for offset, page in pages]
        elif isinstance(event, codec.RamZeroPages):
            items += [("zero", int(o), None) for o in event.offsets]
    return items


async def test_urgent_requests_are_sent_even_when_already_sent() -> None:
    blocks = create_blocks([RamBlockSpec("pc.ram", 8 * PAGE)])
    try:
        blocks[0].pages[2:] = np.random.default_rng(3).integers(1, 256, (6, PAGE), dtype=np.uint8)
        page3, page4 = bytes(blocks[0].pages[3]), bytes(blocks[0].pages[4])
        stats = SourceStats()
        ram = RamSaver(blocks, stats)
        recorder = Recorder()
        urgent = MigrationChannel(recorder)
        sender = UrgentSender(ram, urgent)
        for page in (0, 3, 3):  # page 3 twice: the second copy goes too
            await sender.send_now(PageRequest("pc.ram", page * PAGE, PAGE))
        assert decoded(bytes(recorder.data), 8 * PAGE) == [
            ("zero", 0, None),
            ("page", 3 * PAGE, page3),
            ("page", 3 * PAGE, page3),
        ]
        assert not ram.dirty["pc.ram"][[0, 3]].any() and ram.dirty["pc.ram"][[1, 2, 4]].all()
        assert (stats.normal, stats.duplicate) == (2, 1)
        assert sender.bytes_sent == len(recorder.data)

        # On the main channel (no preempt) only still-dirty pages go.
        main = Recorder()
        channel = MigrationChannel(main)
        assert sender.queue_request(channel, PageRequest("pc.ram", 3 * PAGE, PAGE)) == 0
        assert sender.queue_request(channel, PageRequest("pc.ram", 4 * PAGE, PAGE)) > 0
        await channel.flush()
        assert decoded(bytes(main.data), 8 * PAGE) == [("page", 4 * PAGE, page4)]
    finally:
        for block in blocks:
            block.close()


async def test_thread_sends_without_touching_the_bitmaps_and_nothing_after_the_end() -> None:
    """The return-path thread's send reads no bitmap and changes none (trio marks the page
    sent when it hears of it: the background sender scans and clears the dirty bitmap in
    trio, and a clear from the thread in the middle of numpy's nonzero gave it garbage
    page numbers). After ``end`` the channel carries its EOF and a late request nothing."""
    blocks = create_blocks([RamBlockSpec("pc.ram", 8 * PAGE)])
    left, right = socket.socketpair()
    try:
        blocks[0].pages[:] = np.random.default_rng(5).integers(1, 256, (8, PAGE), dtype=np.uint8)
        ram = RamSaver(blocks, SourceStats())
        left.setblocking(False)
        stream = SocketStream(trio.socket.from_stdlib_socket(left), transport="unix", peer="pair")
        sender = UrgentSender(ram, MigrationChannel(stream, _owner=False))
        assert sender.threaded
        dirty_before = ram.dirty["pc.ram"].copy()
        served = await trio.to_thread.run_sync(
            sender.send_from_thread, PageRequest("pc.ram", 2 * PAGE, PAGE)
        )
        assert (served.data_pages, served.zero_pages) == (1, 0)
        assert np.array_equal(ram.dirty["pc.ram"], dirty_before)  # untouched by the thread
        sender.mark_sent(served.request)  # what trio does with the RequestServed
        assert not ram.dirty["pc.ram"][2] and ram.dirty["pc.ram"].sum() == 7

        ram.dirty["pc.ram"][:] = False  # the background stream sent the rest
        await sender.end()
        late = await trio.to_thread.run_sync(
            sender.send_from_thread, PageRequest("pc.ram", 5 * PAGE, PAGE)
        )
        assert (late.data_pages, late.zero_pages) == (0, 0)
        await sender.send_now(PageRequest("pc.ram", 6 * PAGE, PAGE))
        received = b""
        while chunk := right.recv(1 << 16):  # up to the EOF that end() sent
            received += chunk
        assert decoded(received, 8 * PAGE) == [("page", 2 * PAGE, bytes(blocks[0].pages[2]))]
    finally:
        left.close()
        right.close()
        for block in blocks:
            block.close()


async def test_end_refuses_while_pages_are_dirty() -> None:
    blocks = create_blocks([RamBlockSpec("pc.ram", 2 * PAGE)])
    try:
        sender = UrgentSender(RamSaver(blocks, SourceStats()), MigrationChannel(Recorder()))
        with pytest.raises(LocalProtocolError, match="still dirty"):
            await sender.end()
    finally:
        for block in blocks:
            block.close()


async def test_a_request_moves_the_background_scan_next_to_its_page() -> None:
    """Locality: after a requested page the background stream continues from the window
    that follows it (the guest is likely to touch its neighbours next), wrapping after."""
    blocks = create_blocks([RamBlockSpec("a", 4 * MIB), RamBlockSpec("b", 4 * MIB)])
    try:
        ram = RamSaver(blocks, SourceStats())
        sender = UrgentSender(ram, None)
        main = MigrationChannel(Recorder())
        assert ram.next_dirty_window() == (blocks[0], 0)
        sender.queue_request(main, PageRequest("b", 600 * PAGE, PAGE))
        window = ram.next_dirty_window()
        assert window is not None and (window[0].name, window[1]) == ("b", 512)
        ram.dirty["b"][512:] = False  # the rest of "b" is sent: the scan wraps to "a"
        window = ram.next_dirty_window()
        assert window is not None and (window[0].name, window[1]) == ("a", 0)
    finally:
        for block in blocks:
            block.close()
