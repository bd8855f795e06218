"""The destination's zero holes at LISTEN (RamLoader.take_zero_holes): exactly the pages
received as zero and never written stay holes that the fault path fills with zeros; a page
that holds data is never one (it would be lost). Real memfds."""

from __future__ import annotations

import numpy as np

from trimig import codec
from trimig.loadvm.ram_loader import RamLoader
from trimig.ram_blocks import RamBlockSpec, create_blocks

PAGE = 4096
PAGES = 256


def test_zero_holes_are_the_pages_received_as_zero_and_never_written() -> None:
    (block,) = create_blocks([RamBlockSpec("pc.ram", PAGES * PAGE)])
    try:
        loader = RamLoader([block])
        infos = (codec.RamBlockInfo(block.name, block.size, None),)
        loader.check_mem_size(codec.RamMemSize(block.size, infos), postcopy=True)
        rng = np.random.default_rng(3)

        def offsets(pages: list[int]) -> np.ndarray:
            return np.array(pages, dtype=np.uint64) * np.uint64(PAGE)

        data = [0, 1, 2, 50, 51, 200]
        loader.load_pages(
            codec.RamPages(block.name, offsets(data), rng.integers(1, 256, (6, PAGE), np.uint8))
        )
        zero = [3, 4, 51, 100, 101, 255]  # 51: data, then zero again
        loader.load_zero_pages(codec.RamZeroPages(block.name, offsets(zero)))
        loader.discard(block.name, 100 * PAGE, PAGE)  # stale: neither received nor a hole
        holes = loader.take_zero_holes()[block.name]
        assert holes.shape == (PAGES,)
        assert np.flatnonzero(holes).tolist() == [3, 4, 51, 101, 255]
        received = loader.received.block(block.name).bits
        # They leave the received bitmap; the data pages stay received.
        assert np.flatnonzero(received).tolist() == [0, 1, 2, 50, 200]
    finally:
        block.close()
