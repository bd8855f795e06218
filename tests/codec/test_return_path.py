"""Return path: encoder/decoder round trips, framing errors, received bitmaps."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimig import codec
from trimig.codec import (
    NEED_DATA,
    Pong,
    ReqPages,
    ResumeAck,
    ReturnPathDecoder,
    RpRecvBitmap,
    Shut,
    SwitchoverAck,
)
from trimig.errors import LocalProtocolError, RemoteProtocolError

from .helpers import decode_in_pieces, decode_whole, drain

u32 = st.integers(0, 2**32 - 1)
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789/._:-é", min_size=1, max_size=60)


def encode(event: object) -> bytes:
    if isinstance(event, Shut):
        return codec.encode_rp_shut(event.status)
    if isinstance(event, Pong):
        return codec.encode_rp_pong(event.value)
    if isinstance(event, ReqPages):
        return codec.encode_rp_req_pages(event.start, event.length, event.block)
    if isinstance(event, RpRecvBitmap):
        return codec.encode_rp_recv_bitmap(event.block, event.bitmap)
    if isinstance(event, ResumeAck):
        return codec.encode_rp_resume_ack(event.value)
    assert isinstance(event, SwitchoverAck)
    return codec.encode_rp_switchover_ack()


messages = st.one_of(
    st.builds(Pong, u32),
    st.builds(ReqPages, names, st.integers(0, 2**64 - 1), st.integers(1, 2**32 - 1)),
    st.builds(RpRecvBitmap, names, st.binary(max_size=64).map(lambda b: b + bytes(-len(b) % 8))),
    st.builds(ResumeAck, u32),
    st.builds(SwitchoverAck),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[object]:
    """Messages as a destination sends them: REQ_PAGES only after a named request,
    SHUT (if any) last."""
    events = draw(st.lists(messages, max_size=12))
    result: list[object] = []
    named = False
    for event in events:
        if isinstance(event, ReqPages) and named and draw(st.booleans()):
            event = ReqPages(None, event.start, event.length)
        named = named or isinstance(event, ReqPages)
        result.append(event)
    if draw(st.booleans()):
        result.append(Shut(draw(u32)))
    return result


@settings(max_examples=200, deadline=None)
@given(conversations(), st.lists(st.integers(0, 3000), max_size=30), st.booleans())
def test_round_trip_in_any_pieces(events: list[object], cuts: list[int], zero_copy: bool) -> None:
    data = b"".join(encode(event) for event in events)
    assert decode_whole(data, ReturnPathDecoder()) == events
    pieces = [cut % (len(data) + 1) for cut in cuts]
    decoded = decode_in_pieces(data, pieces, ReturnPathDecoder(), zero_copy=zero_copy)
    assert decoded == events


@settings(max_examples=100, deadline=None)
@given(conversations().filter(bool), st.data())
def test_truncation_raises(events: list[object], data: st.DataObject) -> None:
    stream = b"".join(encode(event) for event in events)
    boundaries = set()
    position = 0
    for event in events:
        boundaries.add(position)
        position += len(encode(event))
    cut = data.draw(st.integers(0, len(stream) - 1))
    decoder = ReturnPathDecoder()
    decoder.receive_data(stream[:cut])
    decoder.receive_eof()
    if cut in boundaries:
        assert drain(decoder) == events[: sorted(boundaries).index(cut)]
    else:
        with pytest.raises(RemoteProtocolError, match="stream truncated"):
            drain(decoder)


REQUEST = struct.pack(">QI", 0x10000, 4096)  # start, length of a page request


def frame(kind: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">HH", kind, size) + payload


def rp_error(data: bytes, *, eof: bool = True) -> str:
    decoder = ReturnPathDecoder()
    decoder.receive_data(data)
    if eof:
        decoder.receive_eof()
    with pytest.raises(RemoteProtocolError) as info:
        while decoder.next_event() is not NEED_DATA:
            pass
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(0), "unknown return-path message type 0"),
        (frame(8), "unknown return-path message type 8"),
        (frame(0xFFFF), "unknown return-path message type 65535"),
        (frame(1, bytes(3)), "SHUT received with bad length 3 (expected 4)"),
        (frame(2, bytes(5)), "PONG received with bad length 5"),
        (frame(4, bytes(11)), "REQ_PAGES received with bad length 11 (expected 12)"),
        (frame(6, bytes(0)), "RESUME_ACK received with bad length 0"),
        (frame(7, bytes(1)), "SWITCHOVER_ACK received with bad length 1 (expected 0)"),
        (frame(3, length=513), "REQ_PAGES_ID of 513 bytes (at most 512)"),
        (frame(5, length=0xFFFF), "RECV_BITMAP of 65535 bytes"),
        (frame(3, REQUEST + b"\x05abc"), "REQ_PAGES_ID received with bad length 16"),
        (frame(3, REQUEST + b"\x00"), "REQ_PAGES_ID received with bad length 13"),
        (frame(3, bytes(8) + bytes(4) + b"\x01a"), "REQ_PAGES_ID for 0 bytes"),
        (frame(4, REQUEST), "REQ_PAGES before any REQ_PAGES_ID"),
        (frame(5, b"\x02a"), "RECV_BITMAP received with bad length 2"),
        (frame(5, b"\x01a") + struct.pack(">Q", 12), "received bitmap of 12 bytes"),
        (
            frame(5, b"\x01a") + struct.pack(">Q", 8) + bytes(8) + struct.pack(">Q", 1),
            "bad end marker 0x1",
        ),
        (codec.encode_rp_shut(0) + codec.encode_rp_pong(1), "return-path data after SHUT"),
    ],
)
def test_framing_errors(data: bytes, message: str) -> None:
    error = rp_error(data)
    assert message in error and "at offset" in error


def test_length_errors_do_not_wait_for_the_payload() -> None:
    assert "of 600 bytes" in rp_error(frame(3, length=600), eof=False)


def test_encoders_refuse_what_the_decoder_would_refuse() -> None:
    with pytest.raises(LocalProtocolError, match="at most 512"):
        codec.encode_rp_message(codec.RpMsg.PONG, bytes(513))
    with pytest.raises(LocalProtocolError, match="0 bytes"):
        codec.encode_rp_req_pages(0, 0, "a")
    with pytest.raises(LocalProtocolError, match="multiple of 8"):
        codec.encode_rp_recv_bitmap("a", bytes(7))
    with pytest.raises(LocalProtocolError, match="32 unsigned bits"):
        codec.encode_rp_shut(-1)
    longest = codec.encode_rp_req_pages(0, 4096, "x" * 255)
    assert len(longest) == 4 + 13 + 255


def test_recv_bitmap_wire_layout() -> None:
    bitmap = codec.pack_received_bitmap([True] + [False] * 8 + [True])  # pages 0 and 9
    assert bitmap == b"\x01\x02" + bytes(6)
    data = codec.encode_rp_recv_bitmap("pc.ram", bitmap)
    assert data == (
        b"\x00\x05\x00\x07\x06pc.ram"
        + (8).to_bytes(8, "big")
        + bitmap
        + bytes.fromhex("0123456789abcdef")
    )


@given(st.lists(st.booleans(), max_size=300))
def test_received_bitmap_helpers(bits: list[bool]) -> None:
    packed = codec.pack_received_bitmap(bits)
    assert len(packed) == codec.recv_bitmap_size(len(bits))
    assert len(packed) % 8 == 0 and len(packed) * 8 >= len(bits)
    assert codec.unpack_received_bitmap(packed, len(bits)).tolist() == bits
    words = np.frombuffer(packed, dtype="<u8")
    for page, bit in enumerate(bits):  # bit p of the little-endian word p // 64
        assert bool(int(words[page // 64]) >> (page % 64) & 1) == bit
