"""PageScatter and feed_decoder: page records read straight into place-ready rows, over
real sockets, against the decoder's own reading of the same bytes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from codec.helpers import normalize
from codec.streams import Built, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimig import codec
from trimig.codec import NEED_DATA, ChannelClosed
from trimig.codec.constants import PAGE_RECORD_SIZE, RAM_SAVE_FLAG_EOS
from trimig.errors import LocalProtocolError
from trimig.loadvm.scatter import MAX_RECORDS, PageScatter, feed_decoder
from trimig.threads import StopSignal, ThreadStream

PAGE = 4096
BLOCK_SIZE = 64 * PAGE


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    with reader, writer:
        yield reader, writer


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    signal = StopSignal()
    yield signal
    signal.close()


def page_records(pages: list[int], *, seed: int = 0) -> tuple[bytes, list[bytes]]:
    """CONTINUE page records for ``pages`` (page numbers) of a block already named."""
    encoder = codec.RamRecordEncoder()
    encoder.last_block = "ram"
    memory = np.random.default_rng(seed).integers(0, 256, BLOCK_SIZE, dtype=np.uint8)
    offsets = np.array(pages, dtype=np.uint64) * PAGE
    data = b"".join(bytes(part) for part in encoder.encode_pages("ram", offsets, memory))
    return data, [bytes(memory[page * PAGE : (page + 1) * PAGE]) for page in pages]


def eos() -> bytes:
    return RAM_SAVE_FLAG_EOS.to_bytes(8, "big")


def write_in_pieces(
    writer: socket.socket, data: bytes, piece: int, *, pause: float = 0.0
) -> threading.Thread:
    """Write ``data`` in ``piece``-byte sends (with ``pause`` between), then close."""

    def run() -> None:
        for start in range(0, len(data), piece):
            writer.sendall(data[start : start + piece])
            if pause:
                time.sleep(pause)
        writer.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_takes_the_page_records_and_gives_back_the_rest(pair: Any, stop: StopSignal) -> None:
    reader, writer = pair
    data, pages = page_records([3, 4, 5, 9, 10])
    writer.sendall(data + eos())
    scatter = PageScatter()
    read = scatter.read(ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE)
    assert read is not None and read.count == 5 and not read.eof
    assert read.leftover == eos()
    assert scatter.offsets(5).tolist() == [page * PAGE for page in (3, 4, 5, 9, 10)]
    assert [bytes(row) for row in scatter.pages[:5]] == pages


def test_records_split_anywhere_are_completed(pair: Any, stop: StopSignal) -> None:
    reader, writer = pair
    numbers = list(range(40))
    data, pages = page_records(numbers, seed=1)
    thread = write_in_pieces(writer, data, 1000, pause=0.001)
    scatter = PageScatter(records=7)
    got: list[bytes] = []
    while True:
        read = scatter.read(ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE)
        assert read is not None
        assert read.leftover == b""  # whole records only, never half of one
        got += [bytes(row) for row in scatter.pages[: read.count]]
        if read.eof:
            break
    thread.join()
    assert got == pages


def test_a_prefix_from_the_decoder_starts_the_first_record(pair: Any, stop: StopSignal) -> None:
    reader, writer = pair
    data, _ = page_records([7, 8])
    for cut in (3, 8, 100, PAGE_RECORD_SIZE - 1):
        writer.sendall(data[cut:])
        read = PageScatter().read(
            ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE, prefix=data[:cut]
        )
        assert read is not None and read.count == 2 and read.leftover == b""


def test_a_prefix_of_another_record_reads_nothing(pair: Any, stop: StopSignal) -> None:
    reader, _ = pair
    # Nothing is written: reading would block, so returning proves it did not read.
    read = PageScatter().read(
        ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE, prefix=eos() + b"\x02"
    )
    assert read is not None and read.count == 0 and read.leftover == eos() + b"\x02"


def test_a_page_outside_the_block_is_left_to_the_decoder(pair: Any, stop: StopSignal) -> None:
    reader, writer = pair
    data, _ = page_records([1, 2, 63])
    writer.sendall(data)
    read = PageScatter().read(ThreadStream(reader.fileno()), stop, block_size=63 * PAGE)
    assert read is not None and read.count == 2
    assert read.leftover == data[2 * PAGE_RECORD_SIZE :]


def test_a_stream_ending_inside_a_record(pair: Any, stop: StopSignal) -> None:
    reader, writer = pair
    data, _ = page_records([1, 2])
    writer.sendall(data[:-100])
    writer.shutdown(socket.SHUT_WR)
    read = PageScatter().read(ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE)
    assert read is not None and read.count == 1 and read.eof
    assert read.leftover == data[PAGE_RECORD_SIZE:-100]


def test_stop_ends_a_waiting_read(pair: Any, stop: StopSignal) -> None:
    reader, _ = pair
    threading.Timer(0.05, stop.set).start()
    assert PageScatter().read(ThreadStream(reader.fileno()), stop, block_size=BLOCK_SIZE) is None


def test_sizes() -> None:
    with pytest.raises(ValueError, match="a scatter holds"):
        PageScatter(records=MAX_RECORDS + 1)


def decode_with_scatter(built: Built, piece: int, records: int) -> tuple[list[Any], int]:
    """The stream's events as a postcopy listener sees them (written to a socket in
    ``piece``-byte pieces, read with feed_decoder), and how many pages were scattered."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    stop = StopSignal()
    decoder = built.decoder()
    scatter = PageScatter(records=records)
    items: list[Any] = []
    scattered = 0

    def place(block: str, offsets: np.ndarray, pages: np.ndarray) -> None:
        nonlocal scattered
        scattered += len(offsets)
        items.extend(
            ("page", block, int(offset), bytes(page))
            for offset, page in zip(offsets.tolist(), pages, strict=True)
        )

    thread = write_in_pieces(writer, built.data, piece)
    try:
        while True:
            event = decoder.next_event()
            if event is NEED_DATA:
                assert feed_decoder(
                    decoder, ThreadStream(reader.fileno()), scatter, stop, place=place
                )
            elif isinstance(event, ChannelClosed):
                return items, scattered
            else:
                items.extend(normalize(event, decoder))
    finally:
        thread.join()
        reader.close()
        writer.close()
        stop.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.sampled_from([7, 4104, 5000, 65536]), st.sampled_from([1, 3, MAX_RECORDS]))
def test_scattered_reading_gives_the_same_events(built: Built, piece: int, records: int) -> None:
    assert decode_with_scatter(built, piece, records)[0] == built.events


def test_runs_of_pages_are_scattered() -> None:
    """A stream of long page runs (the postcopy background stream): the scatter takes
    nearly all pages, and the events are the decoder's."""

    encoder = codec.RamRecordEncoder()
    memory = np.random.default_rng(5).integers(0, 256, 2048 * PAGE, dtype=np.uint8)
    info = [codec.RamBlockInfo("ram", len(memory), None)]
    parts = [
        codec.encode_file_header(),
        codec.encode_configuration(),
        codec.encode_ram_setup(0, info, postcopy=False),
    ]
    for first in range(0, 2048, 512):
        offsets = np.arange(first, first + 512, dtype=np.uint64) * PAGE
        parts.append(codec.encode_section_part(0))
        parts += [bytes(part) for part in encoder.encode_pages("ram", offsets, memory)]
        parts += [codec.encode_end_of_section(), codec.encode_section_footer(0)]
    parts.append(codec.encode_eof())
    data = b"".join(parts)
    expected_pages = [
        ("page", "ram", page * PAGE, bytes(memory[page * PAGE : (page + 1) * PAGE]))
        for page in range(2048)
    ]
    built = Built(data, [], [], [], [], {}, False)
    items, scattered = decode_with_scatter(built, 1 << 16, MAX_RECORDS)
    assert [item for item in items if isinstance(item, tuple)] == expected_pages
    # All but what follows a section boundary in a read (1870-2000 of 2048 here); how the
    # writer thread's pieces fall between reads varies with load, hence the margin.
    assert scattered >= 2048 // 2


def test_the_decoder_hands_over_only_between_ram_records() -> None:
    decoder = codec.StreamDecoder()
    assert decoder.take_ram_records() is None  # before the header
    info = [codec.RamBlockInfo("ram", BLOCK_SIZE, None)]
    decoder.receive_data(
        codec.encode_file_header()
        + codec.encode_configuration()
        + codec.encode_ram_setup(0, info, postcopy=False)
    )
    while decoder.next_event() is not NEED_DATA:
        pass
    assert decoder.take_ram_records() is None  # between sections
    decoder.receive_data(codec.encode_section_part(0) + eos()[:5])
    assert decoder.next_event() == codec.SectionPart(0)
    # In the body, but no record named a block yet: CONTINUE would mean nothing.
    assert decoder.take_ram_records() is None
    assert decoder.buffered == 5
    with pytest.raises(LocalProtocolError, match="skip"):
        decoder.skip(8)


def test_take_and_skip_keep_the_stream_offset() -> None:
    decoder = codec.StreamDecoder()
    info = [codec.RamBlockInfo("ram", BLOCK_SIZE, None)]
    encoder = codec.RamRecordEncoder()
    memory = np.zeros(BLOCK_SIZE, dtype=np.uint8)
    first = encoder.encode_pages("ram", np.array([0], np.uint64), memory)
    head = b"".join(
        [
            codec.encode_file_header(),
            codec.encode_configuration(),
            codec.encode_ram_setup(0, info, postcopy=False),
            codec.encode_section_part(0),
            *(bytes(part) for part in first),
        ]
    )
    decoder.receive_data(head + b"\x01\x02\x03")
    while decoder.next_event() is not NEED_DATA:
        pass
    assert decoder.offset == len(head)
    assert decoder.take_ram_records() == ("ram", BLOCK_SIZE, b"\x01\x02\x03")
    assert decoder.buffered == 0 and decoder.offset == len(head)
    decoder.skip(2 * PAGE_RECORD_SIZE)
    assert decoder.offset == len(head) + 2 * PAGE_RECORD_SIZE
