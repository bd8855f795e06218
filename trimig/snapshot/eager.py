"""Eager loading of a mapped-ram snapshot: every page read before the guest runs.

As QEMU's ``read_ramblock_mapped_ram``: for each run of set bits the pages are read into
the block at the same offset, at most 1 MiB per read (``MAPPED_RAM_LOAD_BUF_SIZE``); pages
whose bit is clear are left alone (a fresh memfd reads them as zero, without allocating).
The reads go straight into the engine's mapping of each block (hugetlb blocks included).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..codec.constants import TARGET_PAGE_SIZE
from ..kernel.iov import write_rows_at
from ..ram_blocks import RamBlock
from .file import Snapshot

#: Target pages per read (QEMU's MAPPED_RAM_LOAD_BUF_SIZE, 1 MiB).
LOAD_CHUNK_PAGES = 256


def present_runs(present: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a bool array."""
    if not present.any():
        return []
    edges = np.diff(np.concatenate(([0], present.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def load_eagerly(snapshot: Snapshot, blocks: Sequence[RamBlock]) -> int:
    """Read every present page of ``snapshot`` into ``blocks``; return the pages read.

    A 4 KiB block is filled through its memfd (read into a bounce buffer, then pwritev),
    which allocates each page as it fills it: through the mapping every page would first
    be faulted in and zeroed. A hugetlb block (no write(2) on hugetlbfs) is read into
    the mapping."""
    loaded = 0
    bounce = np.empty((LOAD_CHUNK_PAGES, TARGET_PAGE_SIZE), dtype=np.uint8)
    for block in blocks:
        source = snapshot.blocks[block.name]
        for start, end in present_runs(source.present):
            for first in range(start, end, LOAD_CHUNK_PAGES):
                count = min(LOAD_CHUNK_PAGES, end - first)
                if block.spec.hugetlb:
                    snapshot.read_pages(source, first, block.pages[first : first + count])
                else:
                    snapshot.read_pages(source, first, bounce[:count])
                    write_rows_at(block.fd, first * TARGET_PAGE_SIZE, bounce[:count])
                loaded += count
    return loaded
