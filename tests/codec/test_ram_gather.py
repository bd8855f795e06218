"""encode_pages_gather: the same bytes and CONTINUE state as encode_pages, as a raw array."""

from __future__ import annotations

import numpy as np
import pytest

from trimig.codec import RamRecordEncoder
from trimig.errors import LocalProtocolError
from trimig.kernel.iov import IoVector, flatten

PAGE = 4096


def gathered(headers: np.ndarray, entries: np.ndarray, memory: np.ndarray) -> bytes:
    return b"".join(bytes(view) for view in flatten([IoVector(entries, (headers, memory))]))


def test_gather_array_matches_the_gather_list_across_blocks() -> None:
    memory = np.random.default_rng(0).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    by_list, by_array = RamRecordEncoder(), RamRecordEncoder()
    calls = [
        ("pc.ram", [0, 3 * PAGE, 9 * PAGE]),  # names the block
        ("pc.ram", [10 * PAGE]),  # CONTINUE, one page
        ("pc.huge", list(range(0, 64 * PAGE, PAGE))),  # another block: named again
        ("pc.ram", [63 * PAGE]),
    ]
    for block, offsets in calls:
        want = b"".join(bytes(part) for part in by_list.encode_pages(block, offsets, memory))
        headers, entries = by_array.encode_pages_gather(block, offsets, memory)
        assert entries.shape == (2 * len(offsets), 2)
        assert gathered(headers, entries, memory) == want
        assert by_array.last_block == by_list.last_block == block


def test_page_entries_point_into_the_source() -> None:
    memory = np.zeros(8 * PAGE, dtype=np.uint8)
    _, entries = RamRecordEncoder().encode_pages_gather("m", [2 * PAGE, 5 * PAGE], memory)
    assert entries[1::2, 0].tolist() == [
        memory.ctypes.data + 2 * PAGE,
        memory.ctypes.data + 5 * PAGE,
    ]
    assert entries[1::2, 1].tolist() == [PAGE, PAGE]


def test_empty_and_bad_offsets() -> None:
    memory = np.zeros(4 * PAGE, dtype=np.uint8)
    encoder = RamRecordEncoder()
    headers, entries = encoder.encode_pages_gather("m", [], memory)
    assert len(headers) == 0 and entries.shape == (0, 2)
    assert encoder.last_block is None
    with pytest.raises(LocalProtocolError, match="outside its"):
        encoder.encode_pages_gather("m", [4 * PAGE], memory)
    with pytest.raises(LocalProtocolError, match="outside its"):
        encoder.encode_pages_gather("m", [PAGE], memory, source_offset=2 * PAGE)
    with pytest.raises(LocalProtocolError, match="not a multiple"):
        encoder.encode_pages_gather("m", [100], memory)


def test_source_offset_points_into_a_staging_buffer() -> None:
    """Pages of a block read into a buffer that starts at block offset 8 pages."""
    staging = np.zeros(4 * PAGE, dtype=np.uint8)
    encoder = RamRecordEncoder()
    headers, entries = encoder.encode_pages_gather(
        "m", [8 * PAGE, 11 * PAGE], staging, source_offset=8 * PAGE
    )
    assert entries[1::2, 0].tolist() == [staging.ctypes.data, staging.ctypes.data + 3 * PAGE]
    # The headers still carry the block offsets.
    assert headers[:8].view(">u8")[0] & ~np.uint64(0xFFF) == 8 * PAGE
