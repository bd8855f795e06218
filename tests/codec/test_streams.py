"""Whole generated streams: round trips, arbitrary split points, truncation, corruption."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trimig.errors import RemoteProtocolError

from .helpers import decode_in_pieces, decode_whole, drain, is_prefix
from .streams import Built, streams

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(streams())
def test_generated_stream_round_trips(built: Built) -> None:
    assert decode_whole(built.data, built.decoder()) == built.events


@SETTINGS
@given(streams(), st.data(), st.booleans())
def test_any_split_gives_the_same_events(
    built: Built, data: st.DataObject, zero_copy: bool
) -> None:
    size = len(built.data)
    cuts = data.draw(st.lists(st.integers(0, size), max_size=40))
    if data.draw(st.booleans()):  # many small pieces near the start as well
        cuts += list(range(0, min(size, 300), data.draw(st.integers(1, 13))))
    decoded = decode_in_pieces(built.data, cuts, built.decoder(), zero_copy=zero_copy)
    assert decoded == built.events


@SETTINGS
@given(streams(), st.sampled_from([1, 2, 3, 5, 8, 9, 100, 4103, 4104, 4105, 9000]))
def test_byte_at_a_time_and_chunked_feeding(built: Built, chunk: int) -> None:
    cuts = list(range(0, len(built.data), chunk))[:2000]  # then the rest in one piece
    assert decode_in_pieces(built.data, cuts, built.decoder(), zero_copy=True) == built.events


def _decode_truncated(built: Built, cut: int) -> tuple[list[object], RemoteProtocolError | None]:
    decoder = built.decoder()
    decoder.receive_data(built.data[:cut])
    decoder.receive_eof()
    items: list[object] = []
    try:
        drain(decoder, items)
    except RemoteProtocolError as exc:
        return items, exc
    return items, None


@SETTINGS
@given(streams(), st.data())
def test_every_truncation_raises(built: Built, data: st.DataObject) -> None:
    size = len(built.data)
    cuts = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=25))
    cuts += built.legal_ends[:-1] + built.any_change[:10] + [0, size - 1]
    for cut in cuts:
        items, error = _decode_truncated(built, cut)
        # Never a wrong event: what came out before the error is a prefix.
        assert is_prefix(items, built.events)
        if cut in built.legal_ends:
            assert error is None  # cut right after EOF: the VM description is optional
        else:
            assert error is not None, f"truncation at {cut} of {size} was accepted"
            assert "truncated" in str(error)


@settings(max_examples=5, deadline=None)
@given(streams())
def test_exhaustive_truncation_of_small_streams(built: Built) -> None:
    assume(len(built.data) < 20_000)
    for cut in range(len(built.data)):
        items, error = _decode_truncated(built, cut)
        assert is_prefix(items, built.events)
        assert (error is None) == (cut in built.legal_ends), cut


def _decode_corrupted(built: Built, position: int, value: int) -> list[object] | None:
    corrupted = bytearray(built.data)
    corrupted[position] = value
    try:
        return decode_whole(bytes(corrupted), built.decoder())
    except RemoteProtocolError:
        return None


@SETTINGS
@given(streams(), st.data())
def test_single_byte_corruption_is_detected_or_visible(built: Built, data: st.DataObject) -> None:
    """Any changed byte raises or changes the decoded events: no byte is ignored."""
    for _ in range(8):
        position = data.draw(st.integers(0, len(built.data) - 1))
        original = built.data[position]
        value = data.draw(st.integers(0, 255).filter(original.__ne__))
        decoded = _decode_corrupted(built, position, value)
        assert decoded != built.events, f"byte {position} changed {original:#x}->{value:#x}"


@SETTINGS
@given(streams(), st.data())
def test_structural_corruption_raises(built: Built, data: st.DataObject) -> None:
    """Magic, version, configuration, section ids, footers, fixed command lengths,
    PACKAGED lengths: any other value must fail. RAM flag words with an
    unsupported bit must fail."""
    assert built.any_change and built.flag_bytes  # the test cannot pass vacuously
    for _ in range(6):
        position = data.draw(st.sampled_from(built.any_change))
        original = built.data[position]
        value = data.draw(st.integers(0, 255).filter(original.__ne__))
        assert _decode_corrupted(built, position, value) is None, (position, original, value)
    for _ in range(4):
        position = data.draw(st.sampled_from(built.flag_bytes))
        bit = data.draw(st.sampled_from([0x40, 0x01]))
        assert _decode_corrupted(built, position, built.data[position] ^ bit) is None, position


def test_sensitive_positions_cover_every_kind() -> None:
    """The positions the corruption test relies on really are what they claim."""

    @settings(max_examples=30, deadline=None)
    @given(streams())
    def check(built: Built) -> None:
        data = built.data
        assert data[0:4] == b"QEVM"
        assert set(range(0, 8)) <= set(built.any_change)
        for position in built.flag_bytes:
            assert data[position] & 0xFF in {0x02, 0x04, 0x08, 0x10, 0x22, 0x28, 0x80, 0xA0}

    check()


@pytest.mark.parametrize("cut", [0, 1, 4, 7, 8, 12, 19])
def test_truncated_header_messages(cut: int) -> None:
    from trimig.codec import StreamDecoder, encode_stream_start

    decoder = StreamDecoder()
    decoder.receive_data(encode_stream_start()[:cut])
    decoder.receive_eof()
    with pytest.raises(RemoteProtocolError, match=r"stream truncated .* at offset \d+"):
        drain(decoder)
