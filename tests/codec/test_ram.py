"""RAM records: the encoder's gather lists and CONTINUE state, the decoder's fast
path and buffer views, the raw RAM channel and successor decoders."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimig import codec
from trimig.codec import (
    NEED_DATA,
    ChannelClosed,
    RamBlockInfo,
    RamChannelDecoder,
    RamEndOfSection,
    RamPages,
    RamRecordEncoder,
    RamWritten,
    RamZeroPages,
    StreamDecoder,
)
from trimig.errors import LocalProtocolError, RemoteProtocolError

from .helpers import decode_in_pieces, decode_whole

PAGE = 4096


def random_memory(npages: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, npages * PAGE, dtype=np.uint8)


# --- encoder -----------------------------------------------------------------------


def test_gather_list_payloads_are_slices_of_the_source() -> None:
    memory = random_memory(8)
    gather = RamRecordEncoder().encode_pages("m", [PAGE, 5 * PAGE], memory)
    assert len(gather) == 4
    assert bytes(gather[0]) == (PAGE | 0x08).to_bytes(8, "big") + b"\x01m"
    assert bytes(gather[2]) == (5 * PAGE | 0x28).to_bytes(8, "big")
    assert isinstance(gather[1], memoryview) and isinstance(gather[3], memoryview)
    memory[PAGE : 2 * PAGE] = 7  # no copy was made: the list sees the change
    memory[5 * PAGE] = 9
    assert bytes(gather[1]) == bytes([7]) * PAGE
    assert gather[3][0] == 9


def test_continue_follows_the_last_block_until_reset() -> None:
    memory = random_memory(4)
    encoder = RamRecordEncoder()

    def named(parts: list[bytes | memoryview] | bytes) -> bool:
        first = bytes(parts[0]) if isinstance(parts, list) else parts
        return not first[7] & 0x20

    assert named(encoder.encode_pages("a", [0], memory))
    assert not named(encoder.encode_pages("a", [PAGE], memory))
    assert not named(encoder.encode_zero_pages("a", [0]))
    assert named(encoder.encode_zero_pages("b", [0]))
    assert not named(encoder.encode_written("b", 0, 1))
    assert encoder.encode_end_of_section() == (0x10).to_bytes(8, "big")
    assert not named(encoder.encode_pages("b", [0], memory))  # EOS keeps the last block
    encoder.reset()
    assert named(encoder.encode_written("b", 0, 1))
    assert encoder.encode_pages("b", [], memory) == []
    assert encoder.encode_zero_pages("c", []) == b""
    assert encoder.last_block == "b"  # empty batches change nothing


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([100], "not a multiple of 4096"),
        ([-PAGE], "negative page offset"),
        ([4 * PAGE], "past the end"),
        (np.array([0.0]), "must be integers"),
        (np.zeros((1, 1), dtype=np.uint64), "1-D"),
    ],
)
def test_encode_pages_rejects_bad_offsets(offsets: object, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        RamRecordEncoder().encode_pages("a", offsets, random_memory(4))  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["page", "zero", "reset"]), st.sampled_from("ab"), st.integers(0, 3)
        ),
        max_size=12,
    )
)
def test_one_page_encoders_give_the_bytes_of_the_array_encoders(
    ops: list[tuple[str, str, int]],
) -> None:
    memory = random_memory(4, seed=len(ops))
    one, many = RamRecordEncoder(), RamRecordEncoder()
    for kind, block, page in ops:
        if kind == "reset":
            one.reset()
            many.reset()
        elif kind == "page":
            fast = one.encode_page(block, page * PAGE, memory)
            assert isinstance(fast[1], memoryview)  # the payload is not copied
            assert b"".join(fast) == b"".join(many.encode_pages(block, [page * PAGE], memory))
        else:
            assert one.encode_zero_page(block, page * PAGE) == many.encode_zero_pages(
                block, [page * PAGE]
            )
        assert one.last_block == many.last_block


@pytest.mark.parametrize("offset", [100, -PAGE, 4 * PAGE, 1 << 64])
def test_one_page_encoders_reject_bad_offsets(offset: int) -> None:
    encoder = RamRecordEncoder()
    with pytest.raises(LocalProtocolError, match="page"):
        encoder.encode_page("a", offset, random_memory(4))
    if offset != 4 * PAGE:  # a zero page has no source buffer to lie past
        with pytest.raises(LocalProtocolError, match="page"):
            encoder.encode_zero_page("a", offset)
    assert encoder.last_block is None


def test_encoder_rejects_bad_names_and_hooks() -> None:
    encoder = RamRecordEncoder()
    with pytest.raises(LocalProtocolError, match="must not be empty"):
        encoder.encode_zero_pages("", [0])
    with pytest.raises(LocalProtocolError, match="at most 255"):
        encoder.encode_zero_pages("x" * 256, [0])
    with pytest.raises(LocalProtocolError, match="zero pages"):
        encoder.encode_written("a", 0, 0)
    with pytest.raises(LocalProtocolError, match="not page-aligned"):
        encoder.encode_written("a", 1, 1)
    with pytest.raises(LocalProtocolError, match="32 unsigned bits"):
        encoder.encode_written("a", 0, 1 << 32)
    assert encoder.last_block is None


def test_mem_size_encoder_validates_blocks() -> None:
    with pytest.raises(LocalProtocolError, match="listed twice"):
        codec.encode_mem_size([RamBlockInfo("a", PAGE), RamBlockInfo("a", PAGE)], postcopy=False)
    with pytest.raises(LocalProtocolError, match="positive multiple"):
        codec.encode_mem_size([RamBlockInfo("a", 0)], postcopy=False)
    with pytest.raises(LocalProtocolError, match="power of two"):
        codec.encode_mem_size([RamBlockInfo("a", PAGE, 6000)], postcopy=True)
    # Page sizes are written only in postcopy and only when they differ from 4096.
    plain = codec.encode_mem_size([RamBlockInfo("a", PAGE, 2 << 20)], postcopy=False)
    assert len(plain) == 8 + 2 + 8
    four_k = codec.encode_mem_size([RamBlockInfo("a", PAGE, PAGE)], postcopy=True)
    assert four_k == plain
    huge = codec.encode_mem_size([RamBlockInfo("a", PAGE, 2 << 20)], postcopy=True)
    assert huge == plain + (2 << 20).to_bytes(8, "big")


# --- decoder fast path --------------------------------------------------------------


def prologue(npages: int) -> bytes:
    return (
        codec.encode_stream_start()
        + codec.encode_ram_setup(0, [RamBlockInfo("m", npages * PAGE)], postcopy=False)
        + codec.encode_section_part(0)
    )


def primed_decoder(npages: int) -> StreamDecoder:
    """A decoder that has decoded the prologue and now expects RAM records."""
    decoder = StreamDecoder()
    decoder.receive_data(prologue(npages))
    while decoder.next_event() is not NEED_DATA:
        pass
    return decoder


def ram_events(decoder: StreamDecoder | RamChannelDecoder) -> list[object]:
    events: list[object] = []
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, RamPages | RamZeroPages | RamWritten | RamEndOfSection):
            events.append(event)
    return events


def test_a_run_of_pages_is_one_event_viewing_the_buffer() -> None:
    memory = random_memory(300)
    encoder = RamRecordEncoder()
    offsets = np.arange(0, 300 * PAGE, PAGE, dtype=np.uint64)
    decoder = primed_decoder(300)
    decoder.receive_data(b"".join(encoder.encode_pages("m", offsets, memory)))
    first, run = ram_events(decoder)
    assert isinstance(first, RamPages) and isinstance(run, RamPages)
    assert first.offsets.tolist() == [0]  # the named record
    assert run.offsets.dtype == np.uint64 and run.offsets.tolist() == offsets[1:].tolist()
    assert run.pages.shape == (299, PAGE) and run.pages.dtype == np.uint8
    assert not run.pages.flags.owndata  # a view, not a copy
    assert np.array_equal(run.pages, memory[PAGE:].reshape(299, PAGE))


def test_a_run_of_zero_pages_is_one_event() -> None:
    encoder = RamRecordEncoder()
    offsets = list(range(0, 500 * PAGE, PAGE))
    decoder = primed_decoder(500)
    decoder.receive_data(encoder.encode_zero_pages("m", offsets))
    events = ram_events(decoder)
    assert [len(event.offsets) for event in events] == [1, 499]  # type: ignore[attr-defined]


def test_runs_stop_at_a_change_of_record_kind() -> None:
    memory = random_memory(64)
    encoder = RamRecordEncoder()
    parts: list[bytes | memoryview] = []
    parts += encoder.encode_pages("m", list(range(0, 20 * PAGE, PAGE)), memory)
    parts.append(encoder.encode_zero_pages("m", list(range(20 * PAGE, 40 * PAGE, PAGE))))
    parts.append(encoder.encode_written("m", 40 * PAGE, 3))
    parts += encoder.encode_pages("m", list(range(43 * PAGE, 64 * PAGE, PAGE)), memory)
    parts.append(encoder.encode_end_of_section())
    decoder = primed_decoder(64)
    decoder.receive_data(b"".join(parts))
    kinds = [
        (type(event).__name__, len(getattr(event, "offsets", ()))) for event in ram_events(decoder)
    ]
    assert kinds == [
        ("RamPages", 1),
        ("RamPages", 19),
        ("RamZeroPages", 20),
        ("RamWritten", 0),
        ("RamPages", 21),
        ("RamEndOfSection", 0),
    ]


def test_page_views_survive_get_buffer_until_the_next_call() -> None:
    memory = random_memory(40)
    encoder = RamRecordEncoder()
    records = b"".join(encoder.encode_pages("m", list(range(0, 40 * PAGE, PAGE)), memory))
    data = prologue(40) + records
    decoder = StreamDecoder()
    cut = len(data) - 3 * PAGE  # leave a partial record so get_buffer has to move it
    decoder.receive_data(data[:cut])
    events = ram_events(decoder)
    views = [(event.pages, event.offsets) for event in events if isinstance(event, RamPages)]
    free = len(decoder.get_buffer(1))  # the whole free tail
    region = decoder.get_buffer(free + 1)  # more than is free: the tail must move
    region[:100] = b"\xee" * 100
    for pages, offsets in views:
        for page, offset in zip(pages, offsets.tolist(), strict=True):
            assert np.array_equal(page, memory[offset : offset + PAGE])
    decoder.commit(0)
    decoder.receive_data(data[cut:])
    rest = ram_events(decoder)
    total = sum(len(event.offsets) for event in [*events, *rest] if isinstance(event, RamPages))
    assert total == 40


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["pages", "zeros", "written", "reset"]), st.integers(0, 30)),
        max_size=12,
    ),
    st.lists(st.integers(0, 200_000), max_size=20),
    st.booleans(),
)
def test_raw_ram_channel_round_trip(ops: list[tuple[str, int]], cuts: list[int], eos: bool) -> None:
    """The preempt channel: records only, its own CONTINUE state, EOS optional."""
    blocks = {"a": random_memory(32, 1), "b": random_memory(16, 2)}
    encoder = RamRecordEncoder()
    parts: list[bytes | memoryview] = []
    expected: list[object] = []
    for index, (kind, first) in enumerate(ops):
        name = "ab"[index % 2]
        memory = blocks[name]
        npages = len(memory) // PAGE
        first %= npages
        offsets = list(range(first * PAGE, min(npages, first + 9) * PAGE, PAGE))
        if kind == "pages":
            parts += encoder.encode_pages(name, offsets, memory)
            expected += [("page", name, o, memory[o : o + PAGE].tobytes()) for o in offsets]
        elif kind == "zeros":
            parts.append(encoder.encode_zero_pages(name, offsets))
            expected += [("zero", name, o) for o in offsets]
        elif kind == "written":
            parts.append(encoder.encode_written(name, first * PAGE, npages - first))
            expected.append(RamWritten(name, first * PAGE, npages - first))
        else:
            encoder.reset()
    if eos:
        parts.append(encoder.encode_end_of_section())
        expected.append(RamEndOfSection())
    data = b"".join(parts)
    infos = [RamBlockInfo(name, len(memory)) for name, memory in blocks.items()]
    assert decode_whole(data, RamChannelDecoder(infos)) == expected
    sizes = {name: len(memory) for name, memory in blocks.items()}
    for zero_copy in (False, True):
        decoded = decode_in_pieces(
            data, [c % (len(data) + 1) for c in cuts], RamChannelDecoder(sizes), zero_copy=zero_copy
        )
        assert decoded == expected


def test_raw_ram_channel_errors() -> None:
    encoder = RamRecordEncoder()
    eos = encoder.encode_end_of_section()
    decoder = RamChannelDecoder({"a": PAGE})
    decoder.receive_data(eos + eos)
    assert decoder.next_event() == RamEndOfSection()
    with pytest.raises(RemoteProtocolError, match="data after EOS on the RAM channel at offset 8"):
        decoder.next_event()

    decoder = RamChannelDecoder({"a": PAGE})
    decoder.receive_data(encoder.encode_zero_pages("a", [0])[:-1])
    decoder.receive_eof()
    with pytest.raises(
        RemoteProtocolError, match="stream truncated in RAM ZERO record at offset 0"
    ):
        decoder.next_event()

    decoder = RamChannelDecoder({"a": PAGE})
    decoder.receive_data((PAGE | 4).to_bytes(8, "big"))
    with pytest.raises(RemoteProtocolError, match="MEM_SIZE record outside"):
        decoder.next_event()

    decoder = RamChannelDecoder({"a": PAGE})
    decoder.receive_data(
        RamRecordEncoder().encode_zero_pages("a", [0]) + encoder.encode_zero_pages("a", [0])
    )
    decoder.receive_eof()
    # The encoder above was already on block "a": its record CONTINUEs, which the
    # decoder accepts because the first record named the block.
    events = [decoder.next_event(), decoder.next_event(), decoder.next_event()]
    assert events[-1] == ChannelClosed()


def test_successor_and_ram_channel_decoders_share_the_block_list() -> None:
    memory = random_memory(8)
    encoder = RamRecordEncoder()
    records = b"".join(encoder.encode_pages("m", [0, PAGE], memory))
    decoder = primed_decoder(8)
    decoder.receive_data(records + encoder.encode_end_of_section() + codec.encode_section_footer(0))
    ram_events(decoder)
    assert decoder.ram_blocks == {"m": 8 * PAGE}

    # A replacement main channel (recovery): no header, RAM section 0 is known,
    # but its last block is not: the sender resets and names the block again.
    successor = decoder.successor()
    after = (
        codec.encode_section_part(0)
        + encoder.encode_end_of_section()
        + codec.encode_section_footer(0)
    )
    successor.receive_data(after)
    assert [type(e).__name__ for e in ram_events(successor)] == ["RamEndOfSection"]
    continued = decoder.successor()
    continued.receive_data(
        codec.encode_section_part(0) + b"".join(encoder.encode_pages("m", [0], memory))
    )
    with pytest.raises(RemoteProtocolError, match="no previous block"):
        ram_events(continued)

    preempt = decoder.ram_channel_decoder()
    preempt_encoder = RamRecordEncoder()
    preempt.receive_data(b"".join(preempt_encoder.encode_pages("m", [7 * PAGE], memory)))
    (event,) = ram_events(preempt)
    assert isinstance(event, RamPages) and event.offsets.tolist() == [7 * PAGE]
