"""UrgentSender: what a page request puts on a channel (the bytes decoded back)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trimig import codec
from trimig.channel import MigrationChannel
from trimig.migration import SourceStats
from trimig.postcopy import PageRequest
from trimig.ram_blocks import RamBlockSpec, create_blocks
from trimig.savevm.postcopy import UrgentSender
from trimig.savevm.ram_saver import RamSaver

PAGE = 4096


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
