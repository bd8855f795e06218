"""The return path (destination -> source): ``MIG_RP_MSG_*`` frames.

Frame: be16 type, be16 length (at most 512), payload. ``RECV_BITMAP`` is
followed, outside its frame, by be64 size, the little-endian bitmap and the
end marker ``0x0123456789ABCDEF``; the decoder reads all of it into one
:class:`RpRecvBitmap` event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from trimig.codec._base import DecoderBase
from trimig.codec._wire import (
    BE16,
    BE32,
    BE64,
    Cursor,
    Incomplete,
    Malformed,
    check_uint,
    decode_name,
    encode_counted,
)
from trimig.codec.constants import (
    MAX_RECV_BITMAP_SIZE,
    MAX_RP_MESSAGE_LENGTH,
    MIG_RP_FIXED_LENGTH,
    MIG_RP_MSG_MAX,
    RECV_BITMAP_ENDING,
    RESUME_ACK_VALUE,
    RpMsg,
)
from trimig.codec.events import (
    ChannelClosed,
    Pong,
    ReqPages,
    ResumeAck,
    ReturnPathEvent,
    RpRecvBitmap,
    Shut,
    SwitchoverAck,
)
from trimig.errors import LocalProtocolError

if TYPE_CHECKING:
    from trimig.codec._wire import BytesLike


# --- Received bitmaps ----------------------------------------------------------------


def recv_bitmap_size(npages: int) -> int:
    """Bytes of the received bitmap for ``npages`` pages: ceil(npages / 8) rounded up to 8."""
    return ((npages + 63) // 64) * 8


def pack_received_bitmap(received: npt.ArrayLike) -> bytes:
    """One bool per target page -> the wire bitmap (page p = bit p % 8 of byte p // 8)."""
    bits = np.asarray(received, dtype=bool)
    if bits.ndim != 1:
        raise LocalProtocolError(f"received bitmap must be 1-D, got shape {bits.shape}")
    packed = np.packbits(bits, bitorder="little").tobytes()
    return packed + bytes(recv_bitmap_size(len(bits)) - len(packed))


def unpack_received_bitmap(bitmap: bytes, npages: int) -> npt.NDArray[np.bool_]:
    """The wire bitmap -> one bool per target page (the first ``npages``)."""
    if len(bitmap) * 8 < npages:
        raise LocalProtocolError(f"bitmap of {len(bitmap)} bytes cannot hold {npages} pages")
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=npages, bitorder="little")
    return bits.astype(bool)


# --- Encoders ------------------------------------------------------------------------


def encode_rp_message(msg: RpMsg, payload: bytes = b"") -> bytes:
    """A return-path frame: be16 type, be16 length, payload (at most 512 bytes)."""
    if len(payload) > MAX_RP_MESSAGE_LENGTH:
        raise LocalProtocolError(
            f"return-path message {msg.name} of {len(payload)} bytes "
            f"(at most {MAX_RP_MESSAGE_LENGTH})"
        )
    return BE16.pack(msg) + BE16.pack(len(payload)) + payload


def encode_rp_shut(status: int) -> bytes:
    """SHUT: 0 when the destination finished cleanly, non-zero after an error."""
    return encode_rp_message(RpMsg.SHUT, BE32.pack(check_uint(status, 32, "SHUT status")))


def encode_rp_pong(value: int) -> bytes:
    return encode_rp_message(RpMsg.PONG, BE32.pack(check_uint(value, 32, "PONG value")))


def encode_rp_req_pages(start: int, length: int, block: str | None = None) -> bytes:
    """REQ_PAGES_ID when ``block`` is given, else REQ_PAGES (same block as before)."""
    head = BE64.pack(check_uint(start, 64, "request start")) + BE32.pack(
        check_uint(length, 32, "request length")
    )
    if length == 0:
        raise LocalProtocolError("page request of 0 bytes")
    if block is None:
        return encode_rp_message(RpMsg.REQ_PAGES, head)
    return encode_rp_message(RpMsg.REQ_PAGES_ID, head + encode_counted(block, "RAM block name"))


def encode_rp_recv_bitmap(block: str, bitmap: BytesLike) -> bytes:
    """RECV_BITMAP frame plus the out-of-frame size, bitmap and end marker.

    ``bitmap`` is in wire layout (see :func:`pack_received_bitmap`); its length
    must be a multiple of 8.
    """
    raw = bytes(bitmap)
    if len(raw) % 8 or len(raw) > MAX_RECV_BITMAP_SIZE:
        raise LocalProtocolError(
            f"received bitmap of {len(raw)} bytes (needs a multiple of 8, at most "
            f"{MAX_RECV_BITMAP_SIZE})"
        )
    frame = encode_rp_message(RpMsg.RECV_BITMAP, encode_counted(block, "RAM block name"))
    return frame + BE64.pack(len(raw)) + raw + BE64.pack(RECV_BITMAP_ENDING)


def encode_rp_resume_ack(value: int = RESUME_ACK_VALUE) -> bytes:
    return encode_rp_message(RpMsg.RESUME_ACK, BE32.pack(check_uint(value, 32, "RESUME_ACK value")))


def encode_rp_switchover_ack() -> bytes:
    return encode_rp_message(RpMsg.SWITCHOVER_ACK)


# --- Decoder -------------------------------------------------------------------------


class ReturnPathDecoder(DecoderBase[ReturnPathEvent]):
    """Decodes the return path on the source (same shape as StreamDecoder).

    Rejects type 0 or >= 8, a fixed-length message with another length, any
    frame over 512 bytes, REQ_PAGES before any REQ_PAGES_ID, and anything
    after SHUT. A close at a frame boundary yields :class:`ChannelClosed`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shut = False
        self._block_named = False

    def _step(self) -> ReturnPathEvent:
        buffer = self._buffer
        if buffer.start == buffer.end:
            if self._eof:
                return ChannelClosed()
            raise Incomplete("a return-path message")
        if self._shut:
            raise Malformed("return-path data after SHUT")
        cursor = Cursor(buffer, "a return-path message header")
        number = cursor.be16()
        length = cursor.be16()
        if not 0 < number < MIG_RP_MSG_MAX:
            raise Malformed(f"unknown return-path message type {number}")
        msg = RpMsg(number)
        if length > MAX_RP_MESSAGE_LENGTH:
            raise Malformed(
                f"return-path message {msg.name} of {length} bytes "
                f"(at most {MAX_RP_MESSAGE_LENGTH})"
            )
        expected = MIG_RP_FIXED_LENGTH.get(msg)
        if expected is not None and length != expected:
            raise Malformed(f"{msg.name} received with bad length {length} (expected {expected})")
        cursor.what = f"return-path message {msg.name}"
        cursor.need(length)
        event = self._payload(msg, length, cursor)
        buffer.consume(cursor.used)
        if msg == RpMsg.SHUT:
            self._shut = True
        elif msg == RpMsg.REQ_PAGES_ID:
            self._block_named = True
        return event

    def _payload(self, msg: RpMsg, length: int, cursor: Cursor) -> ReturnPathEvent:
        if msg == RpMsg.SHUT:
            return Shut(cursor.be32())
        if msg == RpMsg.PONG:
            return Pong(cursor.be32())
        if msg == RpMsg.RESUME_ACK:
            return ResumeAck(cursor.be32())
        if msg == RpMsg.SWITCHOVER_ACK:
            return SwitchoverAck()
        if msg == RpMsg.REQ_PAGES or msg == RpMsg.REQ_PAGES_ID:
            start = cursor.be64()
            size = cursor.be32()
            if size == 0:
                raise Malformed(f"{msg.name} for 0 bytes")
            if msg == RpMsg.REQ_PAGES:
                if not self._block_named:
                    raise Malformed("REQ_PAGES before any REQ_PAGES_ID named a block")
                return ReqPages(None, start, size)
            if length < 14 or length != 13 + cursor.u8():
                raise Malformed(f"REQ_PAGES_ID received with bad length {length}")
            block = decode_name(cursor.take(length - 13), "RAM block name")
            return ReqPages(block, start, size)
        assert msg == RpMsg.RECV_BITMAP
        if length < 2 or length != 1 + cursor.u8():
            raise Malformed(f"RECV_BITMAP received with bad length {length}")
        block = decode_name(cursor.take(length - 1), "RAM block name")
        cursor.what = f"the received bitmap of block {block!r}"
        size = cursor.be64()
        if size % 8 or size > MAX_RECV_BITMAP_SIZE:
            raise Malformed(
                f"received bitmap of {size} bytes for block {block!r} "
                f"(needs a multiple of 8, at most {MAX_RECV_BITMAP_SIZE})"
            )
        bitmap = cursor.take(size)
        ending = cursor.be64()
        if ending != RECV_BITMAP_ENDING:
            raise Malformed(f"received bitmap of block {block!r} has bad end marker {ending:#x}")
        return RpRecvBitmap(block, bitmap)
