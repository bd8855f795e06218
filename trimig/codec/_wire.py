"""Internals shared by the encoders and decoders: the receive buffer, the field
cursor, the internal exceptions and the encoding helpers.

Receive buffer: two numpy arrays take turns ("ping-pong"): when the current one has no room
left at its end, the unconsumed bytes move to the start of the other one. So a
view handed out by a decoder (``RamPages.pages``) is never overwritten before
the decoder's next ``next_event``/``receive_data``/``commit`` call, even when
``get_buffer`` has to make room in between.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from trimig.errors import LocalProtocolError

if TYPE_CHECKING:
    from typing import Any, TypeAlias

    import numpy.typing as npt
    from typing_extensions import Buffer

    #: What the codec accepts as bytes: anything with the buffer protocol
    #: (numpy arrays are listed because their stubs lack ``__buffer__`` on 3.11).
    BytesLike: TypeAlias = Buffer | npt.NDArray[Any]

_MIN_CAPACITY = 1 << 16


def as_byte_view(data: BytesLike) -> memoryview:
    """A flat, byte-format memoryview of any C-contiguous buffer."""
    view = data.data if isinstance(data, np.ndarray) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise LocalProtocolError("the codec needs a C-contiguous buffer")
        view = view.cast("B")
    return view


class ReceiveBuffer:
    """Unconsumed bytes ``array[start:end]``; ``offset`` is the stream offset of ``start``."""

    __slots__ = (
        "_arrays",
        "_current",
        "_lent",
        "_other_clean",
        "array",
        "end",
        "offset",
        "start",
        "view",
    )

    def __init__(self) -> None:
        empty = np.empty(0, dtype=np.uint8)
        self._arrays = [empty, empty]
        self._current = 0
        self.array = empty
        self.view = empty.data
        self.start = 0
        self.end = 0
        self.offset = 0  # stream offset of self.start
        self._lent = 0  # size of the region last handed out by get_buffer
        self._other_clean = True  # no live view can point into the other array

    def __len__(self) -> int:
        return self.end - self.start

    def barrier(self) -> None:
        """A decoder call that ends the validity of earlier views."""
        self._other_clean = True

    def consume(self, nbytes: int) -> None:
        self.start += nbytes
        self.offset += nbytes

    def _reserve(self, nbytes: int) -> None:
        if len(self.array) - self.end >= nbytes:
            return
        live = self.end - self.start
        other_index = 1 - self._current
        other = self._arrays[other_index]
        if len(other) < live + nbytes or not self._other_clean:
            capacity = max(_MIN_CAPACITY, 4 * nbytes, 2 * (live + nbytes))
            other = np.empty(capacity, dtype=np.uint8)
            self._arrays[other_index] = other
        other[:live] = self.array[self.start : self.end]
        self._current = other_index
        self.array = other
        self.view = other.data
        self.start = 0
        self.end = live
        self._other_clean = False

    def get_buffer(self, min_size: int) -> memoryview:
        """A writable region of at least ``min_size`` bytes after the data."""
        if min_size < 1:
            raise LocalProtocolError(f"get_buffer needs min_size >= 1, got {min_size}")
        self._reserve(min_size)
        self._lent = len(self.array) - self.end
        return self.view[self.end :]

    def commit(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last ``get_buffer`` region."""
        if not 0 <= nbytes <= self._lent:
            raise LocalProtocolError(
                f"commit({nbytes}) does not fit the {self._lent} bytes lent by get_buffer"
            )
        self.end += nbytes
        self._lent = 0

    def append(self, data: BytesLike) -> None:
        """Copy ``data`` in after the unconsumed bytes."""
        view = as_byte_view(data)
        size = len(view)
        if size:
            self._reserve(size)
            self.view[self.end : self.end + size] = view
            self.end += size
        self._lent = 0


class Incomplete(Exception):
    """Raised inside a decoder step when the buffer does not yet hold the whole record."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Cursor:
    """Reads fields from ``buffer[start:end]`` without consuming them.

    A step reads a whole record through a cursor and only then consumes
    ``cursor.used`` bytes, so a step that runs out of data (``Incomplete``)
    leaves the decoder untouched. ``what`` names the record for the message
    of a truncated stream.
    """

    __slots__ = ("_begin", "end", "pos", "view", "what")

    def __init__(self, buffer: ReceiveBuffer, what: str) -> None:
        self.view = buffer.view
        self.pos = self._begin = buffer.start
        self.end = buffer.end
        self.what = what

    @property
    def used(self) -> int:
        return self.pos - self._begin

    @property
    def available(self) -> int:
        return self.end - self.pos

    def need(self, nbytes: int) -> None:
        if self.end - self.pos < nbytes:
            raise Incomplete(self.what)

    def u8(self) -> int:
        if self.pos >= self.end:
            raise Incomplete(self.what)
        value: int = self.view[self.pos]
        self.pos += 1
        return value

    def be16(self) -> int:
        self.need(2)
        value: int = _BE16.unpack_from(self.view, self.pos)[0]
        self.pos += 2
        return value

    def be32(self) -> int:
        self.need(4)
        value: int = _BE32.unpack_from(self.view, self.pos)[0]
        self.pos += 4
        return value

    def be64(self) -> int:
        self.need(8)
        value: int = _BE64.unpack_from(self.view, self.pos)[0]
        self.pos += 8
        return value

    def take(self, nbytes: int) -> bytes:
        self.need(nbytes)
        data = bytes(self.view[self.pos : self.pos + nbytes])
        self.pos += nbytes
        return data

    def skip(self, nbytes: int) -> int:
        """Skip ``nbytes`` bytes; returns the buffer index where they start."""
        self.need(nbytes)
        start = self.pos
        self.pos += nbytes
        return start

    def counted(self) -> bytes:
        """A counted string: one length byte then that many bytes."""
        if self.pos >= self.end:
            raise Incomplete(self.what)
        length: int = self.view[self.pos]
        self.need(1 + length)
        data = bytes(self.view[self.pos + 1 : self.pos + 1 + length])
        self.pos += 1 + length
        return data


class Malformed(Exception):
    """Raised inside a decoder step for bad input; the decoder adds the stream
    offset of the record and raises :class:`~trimig.errors.RemoteProtocolError`."""


def decode_name(raw: bytes, what: str) -> str:
    """Decode a name from the wire (UTF-8, not empty)."""
    if not raw:
        raise Malformed(f"empty {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} {raw!r} is not valid UTF-8") from None


# --- Encoding helpers ---------------------------------------------------------------

BE16 = _BE16
BE32 = _BE32
BE64 = _BE64


def check_uint(value: int, bits: int, what: str) -> int:
    """``value`` as an int that fits ``bits`` unsigned bits, else LocalProtocolError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise LocalProtocolError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{what} {value} does not fit in {bits} unsigned bits")
    return value


def encode_counted(name: str, what: str) -> bytes:
    """A counted string (length byte + UTF-8 bytes) for a non-empty name."""
    raw = name.encode("utf-8")
    if not raw:
        raise LocalProtocolError(f"{what} must not be empty")
    if len(raw) > 255:
        raise LocalProtocolError(f"{what} {name!r} is {len(raw)} bytes; at most 255 fit")
    return bytes((len(raw),)) + raw
