"""PageBitmap, ReceivedBitmap, the recovery wire format and the text dump."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimig.errors import RemoteProtocolError
from trimig.postcopy.bitmaps import (
    PageBitmap,
    ReceivedBitmap,
    dump_bitmap,
    le_bitmap_size,
)

bit_lists = st.lists(st.booleans(), max_size=700)


@attrs.frozen
class Layout:
    name: str
    size: int
    page_size: int = 4096


def naive_runs(bits: list[bool]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for index, bit in enumerate([*bits, False]):
        if bit and start is None:
            start = index
        elif not bit and start is not None:
            runs.append((start, index - start))
            start = None
    return runs


def naive_le_bytes(bits: list[bool]) -> bytes:
    """One unsigned 64-bit word per 64 pages, bit i%64 of word i//64, each word stored
    little-endian: QEMU's bitmap_to_le on a 64-bit host."""
    words = [0] * ((len(bits) + 63) // 64)
    for index, bit in enumerate(bits):
        if bit:
            words[index // 64] |= 1 << (index % 64)
    return b"".join(word.to_bytes(8, "little") for word in words)


@given(bit_lists)
def test_runs_and_count_match_naive(bits: list[bool]) -> None:
    bitmap = PageBitmap.from_array(bits)
    assert bitmap.runs() == naive_runs(bits)
    assert bitmap.count() == sum(bits)


@given(bit_lists)
def test_le_bytes_match_qemu_layout_and_round_trip(bits: list[bool]) -> None:
    bitmap = PageBitmap.from_array(bits)
    data = bitmap.to_le_bytes()
    assert len(data) == le_bitmap_size(len(bits))
    assert len(data) % 8 == 0 and len(data) >= (len(bits) + 7) // 8
    assert data == naive_le_bytes(bits)
    assert PageBitmap.from_le_bytes(data, len(bits)) == bitmap


@settings(deadline=None)  # a loaded machine can take 400 ms for one example
@given(st.integers(0, 300), st.data())
def test_set_and_clear_ranges_match_naive(npages: int, data: st.DataObject) -> None:
    bitmap = PageBitmap(npages)
    model = [False] * npages
    for _ in range(data.draw(st.integers(0, 8))):
        start = data.draw(st.integers(0, npages))
        count = data.draw(st.integers(0, npages - start))
        value = data.draw(st.booleans())
        (bitmap.set_range if value else bitmap.clear_range)(start, count)
        model[start : start + count] = [value] * count
    assert bitmap.bits.tolist() == model
    for page in range(npages):
        assert bitmap.test(page) == model[page]


def test_le_bitmap_size() -> None:
    assert [le_bitmap_size(n) for n in (0, 1, 8, 64, 65, 128, 129)] == [0, 8, 8, 8, 16, 16, 24]


def test_from_le_bytes_rejects_bad_size_and_padding() -> None:
    with pytest.raises(RemoteProtocolError, match="has 7 bytes, expected 8 for 10 pages"):
        PageBitmap.from_le_bytes(bytes(7), 10)
    with pytest.raises(RemoteProtocolError, match="padding bit 10 past the block's 10 pages"):
        PageBitmap.from_le_bytes(bytes([0, 4, 0, 0, 0, 0, 0, 0]), 10)


def test_out_of_range_is_an_index_error() -> None:
    bitmap = PageBitmap(10)
    with pytest.raises(IndexError, match=r"pages \[8, 12\) out of range for a bitmap of 10"):
        bitmap.set_range(8, 4)
    with pytest.raises(IndexError):
        bitmap.test(10)
    with pytest.raises(IndexError):
        bitmap.set_pages([3, 10])


def test_bits_view_is_read_only() -> None:
    bitmap = PageBitmap(4)
    with pytest.raises(ValueError):
        bitmap.bits[0] = True


def test_inverted_turns_received_into_to_send() -> None:
    bitmap = PageBitmap.from_array([True, False, True])
    assert bitmap.inverted().bits.tolist() == [False, True, False]


def test_received_bitmap_is_addressed_in_bytes() -> None:
    received = ReceivedBitmap([Layout("pc.ram", 64 * 4096), Layout("huge", 2 << 20, 2 << 20)])
    received.mark("pc.ram", 4096, 3 * 4096)
    assert received.block("pc.ram").runs() == [(1, 3)]
    assert received.is_received("pc.ram", 8192)
    assert not received.is_received("pc.ram", 0, 2 * 4096)
    received.mark("huge", 0, 2 << 20)
    assert received.count("huge") == 512
    assert received.count() == 515
    received.clear("pc.ram", 8192)
    assert received.block("pc.ram").runs() == [(1, 1), (3, 1)]
    with pytest.raises(ValueError, match="not aligned"):
        received.mark("pc.ram", 100)
    received.mark_offsets("pc.ram", np.array([0, 63 * 4096], dtype=np.uint64))
    assert received.block("pc.ram").runs() == [(0, 2), (3, 1), (63, 1)]
    with pytest.raises(ValueError, match="offset 0x10 is not target-page aligned"):
        received.mark_offsets("pc.ram", [4096, 16])
    with pytest.raises(IndexError):
        received.mark_offsets("pc.ram", [64 * 4096])
    with pytest.raises(KeyError, match="no RAM block named 'nope'"):
        received.block("nope")


def test_received_bitmap_wire_format_round_trip() -> None:
    received = ReceivedBitmap([Layout("a", 100 * 4096)])
    received.mark("a", 0, 4096)
    received.mark("a", 64 * 4096, 2 * 4096)
    data = received.to_le_bytes("a")
    assert data == bytes([1]) + bytes(7) + bytes([3]) + bytes(7)
    other = ReceivedBitmap([Layout("a", 100 * 4096)])
    assert other.from_le_bytes("a", data) == received.block("a")
    assert other.block("a") == received.block("a")
    with pytest.raises(RemoteProtocolError, match="RAM block 'a': received bitmap has 8 bytes"):
        other.from_le_bytes("a", bytes(8))


def test_dump_rows_of_128_pages() -> None:
    bits = np.zeros(300, dtype=bool)
    bits[0] = bits[129] = bits[299] = True
    lines = dump_bitmap(bits).splitlines()
    assert len(lines) == 3
    assert lines[0] == "0x00000000 : X" + "." * 127
    assert lines[1] == "0x00000080 : .X" + "." * 126
    assert lines[2] == "0x00000100 : " + "." * 43 + "X"


def test_dump_with_expected_skips_matching_lines() -> None:
    bitmap = PageBitmap(384)
    bitmap.set_range(0, 128)
    bitmap.set_range(256, 128)
    bitmap.clear_range(300)
    assert bitmap.dump(expected=False).count("\n") == 2
    dumped = bitmap.dump(expected=True)
    assert dumped.splitlines() == [
        "0x00000080 : " + "." * 128,
        "0x00000100 : " + "X" * 44 + "." + "X" * 83,
    ]
    assert PageBitmap(200).dump(expected=False) == ""
