"""Page bitmaps at target-page (4 KiB) granularity, backed by numpy.

``PageBitmap`` is one block's bitmap (one bool per target page). ``ReceivedBitmap``
is the destination's received map: one ``PageBitmap`` per RAM block, addressed in
bytes, with the postcopy-recovery wire format (``to_le_bytes``/``from_le_bytes``).
``dump_bitmap`` renders any of the sent, dirty or received bitmaps as text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

from ..errors import RemoteProtocolError
from .blocks import TARGET_PAGE_SIZE, BlockLayout, check_layout

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

DUMP_COLUMNS = 128
"""Pages per line of ``dump_bitmap`` (as QEMU's ram_debug_dump_bitmap)."""


def le_bitmap_size(npages: int) -> int:
    """Bytes of a recovery bitmap for ``npages``: ceil(npages/8) rounded up to a multiple of 8."""
    return (npages + 63) // 64 * 8


def bool_runs(bits: BoolArray) -> tuple[IntArray, IntArray]:
    """Return ``(starts, counts)`` of the runs of True in a 1-D bool array (vectorised)."""
    padded = np.zeros(bits.shape[0] + 2, dtype=np.int8)
    padded[1:-1] = bits
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return starts, ends - starts


class PageBitmap:
    """One bit per target page of a block; page indices, not bytes.

    Out-of-range pages raise IndexError naming the range and the bitmap size.
    """

    __slots__ = ("_bits",)

    def __init__(self, npages: int) -> None:
        if npages < 0:
            raise ValueError(f"a bitmap cannot have {npages} pages")
        self._bits: BoolArray = np.zeros(npages, dtype=np.bool_)

    @classmethod
    def from_array(cls, bits: npt.ArrayLike) -> PageBitmap:
        """A bitmap holding a copy of a 1-D array of truth values."""
        array = np.array(bits, dtype=np.bool_)
        if array.ndim != 1:
            raise ValueError(f"a page bitmap is 1-D, got shape {array.shape}")
        bitmap = cls(0)
        bitmap._bits = array
        return bitmap

    @classmethod
    def from_le_bytes(cls, data: bytes | bytearray | memoryview, npages: int) -> PageBitmap:
        """Decode the recovery wire format (see ``to_le_bytes``) for a block of ``npages``.

        Raises RemoteProtocolError if the size is not ``le_bitmap_size(npages)`` or a
        padding bit past the last page is set.
        """
        expected = le_bitmap_size(npages)
        if len(data) != expected:
            raise RemoteProtocolError(
                f"received bitmap has {len(data)} bytes, expected {expected} for {npages} pages"
            )
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        if bits[npages:].any():
            first = npages + int(np.flatnonzero(bits[npages:])[0])
            raise RemoteProtocolError(
                f"received bitmap sets padding bit {first} past the block's {npages} pages"
            )
        return cls.from_array(bits[:npages].astype(np.bool_))

    # -- inspection -------------------------------------------------------

    @property
    def npages(self) -> int:
        return int(self._bits.shape[0])

    def __len__(self) -> int:
        return self.npages

    @property
    def bits(self) -> BoolArray:
        """A read-only view of the bits (valid until the bitmap is replaced)."""
        view = self._bits.view()
        view.flags.writeable = False
        return view

    def test(self, page: int) -> bool:
        """True if ``page`` is set."""
        self._check(page, 1)
        return bool(self._bits[page])

    def test_pages(self, pages: npt.ArrayLike) -> BoolArray:
        """The bits of an array of page indices (bounds-checked)."""
        index = np.asarray(pages, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.npages):
            raise IndexError(f"page index out of range for a bitmap of {self.npages} pages")
        result: BoolArray = self._bits[index]
        return result

    def all_set(self, start: int, count: int) -> bool:
        """True if every page of ``[start, start+count)`` is set."""
        self._check(start, count)
        return bool(self._bits[start : start + count].all())

    def any_set(self, start: int, count: int) -> bool:
        """True if some page of ``[start, start+count)`` is set."""
        self._check(start, count)
        return bool(self._bits[start : start + count].any())

    def count(self) -> int:
        """Number of set pages."""
        return int(np.count_nonzero(self._bits))

    def runs(self) -> list[tuple[int, int]]:
        """``(start_page, page_count)`` of every run of set pages, in order."""
        starts, counts = bool_runs(self._bits)
        return list(zip(starts.tolist(), counts.tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBitmap):
            return NotImplemented
        return bool(np.array_equal(self._bits, other._bits))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PageBitmap(npages={self.npages}, set={self.count()})"

    # -- mutation ---------------------------------------------------------

    def set_range(self, start: int, count: int = 1) -> None:
        """Set pages ``[start, start+count)``."""
        self._check(start, count)
        self._bits[start : start + count] = True

    def clear_range(self, start: int, count: int = 1) -> None:
        """Clear pages ``[start, start+count)``."""
        self._check(start, count)
        self._bits[start : start + count] = False

    def set_pages(self, pages: npt.ArrayLike) -> None:
        """Set an array of page indices (bounds-checked)."""
        index = np.asarray(pages, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.npages):
            raise IndexError(f"page index out of range for a bitmap of {self.npages} pages")
        self._bits[index] = True

    def clear_where(self, mask: npt.ArrayLike) -> None:
        """Clear every page whose entry in the boolean ``mask`` (one per page) is true."""
        array = np.asarray(mask, dtype=np.bool_)
        if array.shape != self._bits.shape:
            raise ValueError(f"mask has shape {array.shape}, the bitmap {self._bits.shape}")
        np.logical_and(self._bits, ~array, out=self._bits)

    def fill(self, value: bool) -> None:
        """Set or clear every page."""
        self._bits[:] = value

    def copy(self) -> PageBitmap:
        return PageBitmap.from_array(self._bits)

    def inverted(self) -> PageBitmap:
        """A new bitmap with every bit flipped (received -> still to send)."""
        return PageBitmap.from_array(~self._bits)

    # -- formats ----------------------------------------------------------

    def to_le_bytes(self) -> bytes:
        """The recovery wire format: one bit per page, bit ``i`` in byte ``i // 8`` at
        position ``i % 8`` (little-endian words), padded with zero bits to
        ``le_bitmap_size(npages)`` bytes."""
        packed = np.packbits(self._bits, bitorder="little")
        size = le_bitmap_size(self.npages)
        return packed.tobytes() + bytes(size - packed.shape[0])

    def dump(self, *, expected: bool | None = None, columns: int = DUMP_COLUMNS) -> str:
        """Text dump; see ``dump_bitmap``."""
        return dump_bitmap(self._bits, expected=expected, columns=columns)

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.npages:
            raise IndexError(
                f"pages [{start}, {start + count}) out of range for a bitmap of {self.npages} pages"
            )


def dump_bitmap(
    bits: PageBitmap | npt.ArrayLike,
    *,
    expected: bool | None = None,
    columns: int = DUMP_COLUMNS,
) -> str:
    """Render a bitmap as text, ``columns`` pages per line, like ram_debug_dump_bitmap.

    Each line is ``0x<first page, hex> : `` then ``X`` for a set page and ``.``
    for a clear one. With ``expected`` given, only lines holding at least one page
    that differs from it are printed (so an all-clean dirty map dumps as "").
    Lines end with a newline.
    """
    if columns <= 0:
        raise ValueError(f"columns must be positive, got {columns}")
    array = bits.bits if isinstance(bits, PageBitmap) else np.asarray(bits, dtype=np.bool_)
    chars = np.where(array, ord("X"), ord(".")).astype(np.uint8)
    lines = []
    for start in range(0, array.shape[0], columns):
        row = array[start : start + columns]
        if expected is not None and not (row != expected).any():
            continue
        text = chars[start : start + columns].tobytes().decode("ascii")
        lines.append(f"{start:#010x} : {text}\n")
    return "".join(lines)


class ReceivedBitmap:
    """The destination's received map: one PageBitmap per block, addressed in bytes.

    Offsets and lengths are byte offsets within the block and must be multiples of
    the target page size; an unknown block raises KeyError naming it.
    """

    def __init__(self, blocks: Iterable[BlockLayout]) -> None:
        self._maps: dict[str, PageBitmap] = {}
        for block in blocks:
            check_layout(block)
            if block.name in self._maps:
                raise ValueError(f"RAM block {block.name!r} is listed twice")
            self._maps[block.name] = PageBitmap(block.size // TARGET_PAGE_SIZE)

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __contains__(self, name: object) -> bool:
        return name in self._maps

    def block(self, name: str) -> PageBitmap:
        """The bitmap of block ``name``."""
        try:
            return self._maps[name]
        except KeyError:
            raise KeyError(f"no RAM block named {name!r} in the received bitmap") from None

    def mark(self, name: str, offset: int, length: int = TARGET_PAGE_SIZE) -> None:
        """Mark ``[offset, offset+length)`` of block ``name`` received."""
        start, count = _pages(name, offset, length)
        self.block(name).set_range(start, count)

    def mark_offsets(self, name: str, offsets: npt.ArrayLike) -> None:
        """Mark the target pages at byte ``offsets`` (e.g. a RamPages event's) received."""
        array = np.asarray(offsets).astype(np.int64, copy=False)
        if array.size and (array % TARGET_PAGE_SIZE).any():
            bad = int(array[np.flatnonzero(array % TARGET_PAGE_SIZE)[0]])
            raise ValueError(f"RAM block {name!r}: offset {bad:#x} is not target-page aligned")
        self.block(name).set_pages(array // TARGET_PAGE_SIZE)

    def clear(self, name: str, offset: int, length: int = TARGET_PAGE_SIZE) -> None:
        """Mark ``[offset, offset+length)`` of block ``name`` not received."""
        start, count = _pages(name, offset, length)
        self.block(name).clear_range(start, count)

    def is_received(self, name: str, offset: int, length: int = TARGET_PAGE_SIZE) -> bool:
        """True if every target page of ``[offset, offset+length)`` was received."""
        start, count = _pages(name, offset, length)
        return self.block(name).all_set(start, count)

    def count(self, name: str | None = None) -> int:
        """Received target pages of one block, or of all blocks."""
        if name is not None:
            return self.block(name).count()
        return sum(bitmap.count() for bitmap in self._maps.values())

    def to_le_bytes(self, name: str) -> bytes:
        """Block ``name``'s bitmap in the recovery wire format (``PageBitmap.to_le_bytes``)."""
        return self.block(name).to_le_bytes()

    def from_le_bytes(self, name: str, data: bytes | bytearray | memoryview) -> PageBitmap:
        """Replace block ``name``'s bits with a bitmap in the recovery wire format.

        Returns the new bitmap. Raises RemoteProtocolError (naming the block) if the
        data does not fit the block.
        """
        current = self.block(name)
        try:
            bitmap = PageBitmap.from_le_bytes(data, current.npages)
        except RemoteProtocolError as error:
            raise RemoteProtocolError(f"RAM block {name!r}: {error}") from None
        self._maps[name] = bitmap
        return bitmap

    def dump(self, name: str, *, expected: bool | None = None) -> str:
        """Text dump of one block's bitmap (``dump_bitmap``)."""
        return self.block(name).dump(expected=expected)


def _pages(name: str, offset: int, length: int) -> tuple[int, int]:
    if offset % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE:
        raise ValueError(
            f"RAM block {name!r}: range offset {offset:#x} length {length:#x} is not "
            f"aligned to the {TARGET_PAGE_SIZE}-byte target page"
        )
    return offset // TARGET_PAGE_SIZE, length // TARGET_PAGE_SIZE
