"""Decoding helpers for the codec tests: drain a decoder into comparable items."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from trimig.codec import (
    NEED_DATA,
    ChannelClosed,
    Packaged,
    RamChannelDecoder,
    RamPages,
    RamZeroPages,
    ReturnPathDecoder,
    StreamDecoder,
)

Decoder = StreamDecoder | RamChannelDecoder | ReturnPathDecoder


def normalize(event: Any, decoder: Decoder) -> list[Any]:
    """Comparable items for one event: runs of pages become one item per page
    (copied, so the decoder's buffer may move on), a package becomes the items
    of its nested decode."""
    if isinstance(event, RamPages):
        assert event.pages.shape == (len(event.offsets), 4096)
        return [
            ("page", event.block, int(offset), bytes(page))
            for offset, page in zip(event.offsets.tolist(), event.pages, strict=True)
        ]
    if isinstance(event, RamZeroPages):
        return [("zero", event.block, int(offset)) for offset in event.offsets.tolist()]
    if isinstance(event, Packaged):
        assert isinstance(decoder, StreamDecoder)
        nested = decoder.package_decoder(event.blob)
        return [("packaged", tuple(drain(nested)))]
    return [event]


def drain(decoder: Decoder, into: list[Any] | None = None) -> list[Any]:
    """Events of a decoder that has received EOF, normalized, up to ChannelClosed.

    Items are appended to ``into`` as they come, so a caller that catches the
    error still sees what was decoded before it.
    """
    items: list[Any] = [] if into is None else into
    while True:
        event = decoder.next_event()
        assert event is not NEED_DATA, "NEED_DATA after receive_eof()"
        if isinstance(event, ChannelClosed):
            assert decoder.next_event() == ChannelClosed()
            return items
        items.extend(normalize(event, decoder))


def decode_whole(data: bytes, decoder: Decoder) -> list[Any]:
    decoder.receive_data(data)
    decoder.receive_eof()
    return drain(decoder)


def decode_in_pieces(
    data: bytes, cuts: Iterable[int], decoder: Decoder, *, zero_copy: bool
) -> list[Any]:
    """Feed ``data`` split at ``cuts``, draining events after every piece."""
    items: list[Any] = []
    view = memoryview(data)
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        piece = view[last:cut]
        last = cut
        if zero_copy:
            target = decoder.get_buffer(max(1, len(piece)))
            target[: len(piece)] = piece
            decoder.commit(len(piece))
        else:
            decoder.receive_data(piece)
        while (event := decoder.next_event()) is not NEED_DATA:
            assert not isinstance(event, ChannelClosed)
            items.extend(normalize(event, decoder))
    decoder.receive_eof()
    return drain(decoder, items)


def is_prefix(prefix: Sequence[Any], full: Sequence[Any]) -> bool:
    return len(prefix) <= len(full) and list(full[: len(prefix)]) == list(prefix)
