"""Each stream event on its own: encode, decode, compare; and event value semantics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimig import codec
from trimig.codec import (
    EndOfStream,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamPages,
    RamZeroPages,
    RecvBitmap,
    SectionFull,
    SectionStart,
    StreamDecoder,
    SwitchoverStart,
    VmDescription,
)
from trimig.errors import LocalProtocolError

from .helpers import decode_whole

PAGE = 4096
BLOCK = "blk"
BLOCK_PAGES = 1 << 20  # 4 GiB block: discard ranges may be large
u32 = st.integers(0, 2**32 - 1)


def encode_command(event: Any) -> bytes:
    if isinstance(event, Ping):
        return codec.encode_ping(event.value)
    if isinstance(event, PostcopyAdvise):
        return codec.encode_postcopy_advise(event.page_size_summary, event.target_page_size)
    if isinstance(event, PostcopyRamDiscard):
        return codec.encode_postcopy_ram_discard(event.block, event.ranges)
    if isinstance(event, RecvBitmap):
        return codec.encode_recv_bitmap(event.block)
    simple = {
        OpenReturnPath: codec.encode_open_return_path,
        PostcopyListen: codec.encode_postcopy_listen,
        PostcopyRun: codec.encode_postcopy_run,
        PostcopyResume: codec.encode_postcopy_resume,
        SwitchoverStart: codec.encode_switchover_start,
    }
    return simple[type(event)]()


page_ranges = st.tuples(st.integers(0, BLOCK_PAGES - 1), st.integers(1, BLOCK_PAGES)).map(
    lambda r: (r[0] * PAGE, min(r[1], BLOCK_PAGES - r[0]) * PAGE)
)
command_events = st.one_of(
    st.builds(Ping, u32),
    st.builds(
        PostcopyAdvise,
        st.integers(1, 2**52 - 1).map(lambda n: n * PAGE),
        st.just(PAGE),
    ),
    st.builds(
        PostcopyRamDiscard,
        st.just(BLOCK),
        st.lists(page_ranges, min_size=1, max_size=12).map(tuple),
    ),
    st.builds(RecvBitmap, st.just(BLOCK)),
    st.sampled_from(
        [OpenReturnPath(), PostcopyListen(), PostcopyRun(), PostcopyResume(), SwitchoverStart()]
    ),
)


#: The section id stream_around gives RAM; generated device sections must not reuse it.
RAM_SECTION_ID = 7


def stream_around(middle: bytes) -> bytes:
    setup = codec.encode_ram_setup(
        RAM_SECTION_ID, [RamBlockInfo(BLOCK, BLOCK_PAGES * PAGE)], postcopy=False
    )
    return codec.encode_stream_start() + setup + middle + codec.encode_eof()


def middle_events(data: bytes) -> list[Any]:
    events = decode_whole(data, StreamDecoder())
    assert events[-1] == EndOfStream()
    return events[6:-1]  # after header, configuration and the RAM START section


@settings(max_examples=300, deadline=None)
@given(command_events)
def test_command_round_trip(event: Any) -> None:
    assert middle_events(stream_around(encode_command(event))) == [event]


idstrs = st.text(min_size=1, max_size=60).filter(lambda s: s != "ram" and len(s.encode()) < 256)


@settings(max_examples=200, deadline=None)
@given(
    u32.filter(lambda i: i != RAM_SECTION_ID),
    idstrs,
    u32,
    u32,
    st.binary(max_size=300),
    st.booleans(),
)
def test_device_section_round_trip(
    section_id: int, idstr: str, instance: int, version: int, data: bytes, full: bool
) -> None:
    if full:
        encoded = codec.encode_device_section(section_id, idstr, instance, version, data)
        header: Any = SectionFull(section_id, idstr, instance, version)
    else:
        encoded = (
            codec.encode_section_start(section_id, idstr, instance, version)
            + codec.encode_blob(data)
            + codec.encode_section_footer(section_id)
        )
        header = SectionStart(section_id, idstr, instance, version)
    decoded = middle_events(stream_around(encoded))
    assert decoded == [header, codec.DeviceState(section_id, data), codec.SectionFooter(section_id)]


@given(st.binary(max_size=500))
def test_vm_description_round_trip(json: bytes) -> None:
    data = stream_around(b"") + codec.encode_vm_description(json)
    assert decode_whole(data, StreamDecoder())[-1] == VmDescription(json)


def test_longest_names_fit_and_longer_are_refused() -> None:
    name = "é" * 127 + "x"  # 255 bytes
    assert middle_events(stream_around(codec.encode_device_section(1, name, 0, 0, b"")))[0] == (
        SectionFull(1, name, 0, 0)
    )
    with pytest.raises(LocalProtocolError, match="at most 255"):
        codec.encode_section_full(1, name + "y", 0, 0)
    with pytest.raises(LocalProtocolError, match="32 unsigned bits"):
        codec.encode_section_part(2**32)
    with pytest.raises(LocalProtocolError, match="not a device section"):
        codec.encode_device_section(0, "ram", 0, 4, b"")


def test_discard_encoder_limits_and_batching() -> None:
    with pytest.raises(LocalProtocolError, match="1 to 12 ranges"):
        codec.encode_postcopy_ram_discard(BLOCK, [])
    with pytest.raises(LocalProtocolError, match="1 to 12 ranges"):
        codec.encode_postcopy_ram_discard(BLOCK, [(0, PAGE)] * 13)
    with pytest.raises(LocalProtocolError, match="not page-aligned"):
        codec.encode_postcopy_ram_discard(BLOCK, [(1, PAGE)])
    ranges = [(i * 2 * PAGE, PAGE) for i in range(30)]
    commands = codec.encode_postcopy_ram_discards(BLOCK, ranges)
    assert len(commands) == 3
    decoded = middle_events(stream_around(b"".join(commands)))
    assert [len(event.ranges) for event in decoded] == [12, 12, 6]
    assert [r for event in decoded for r in event.ranges] == ranges


def test_discard_command_bytes() -> None:
    data = codec.encode_postcopy_ram_discard("ab", [(PAGE, 2 * PAGE)])
    assert data == (
        b"\x08\x00\x06\x00\x15"  # command 6, length 21 = 3 + 2 + 16
        + b"\x00\x02ab\x00"
        + PAGE.to_bytes(8, "big")
        + (2 * PAGE).to_bytes(8, "big")
    )


def test_page_events_compare_by_content() -> None:
    offsets = np.array([0, PAGE], dtype=np.uint64)
    pages = np.zeros((2, PAGE), dtype=np.uint8)
    assert RamPages("a", offsets, pages) == RamPages("a", offsets.copy(), pages.copy())
    assert RamPages("a", offsets, pages) != RamPages("a", offsets + PAGE, pages)
    assert RamZeroPages("a", offsets) == RamZeroPages("a", offsets.copy())
    assert RamZeroPages("a", offsets) != RamZeroPages("b", offsets)
    assert repr(codec.NEED_DATA) == "NEED_DATA"
