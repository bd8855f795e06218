"""RAM section records: the MEM_SIZE list, page records and their fast paths.

Encoding: :class:`RamRecordEncoder` (one per channel) remembers the block of
its last record so that the next record in the same block sets CONTINUE and
omits the name. ``encode_pages`` returns a gather list whose page payloads are
memoryview slices of the source buffer: headers are built by numpy in one go
and no page is copied. ``encode_pages_gather`` gives the same bytes as one
array of (address, length) entries, so a window of pages costs no Python
object per page.

Decoding: :class:`RamRecordDecoder` holds a channel's block sizes and last
block. When the buffer holds several whole ``PAGE|CONTINUE`` (or
``ZERO|CONTINUE``) records back to back, it views them through a numpy
structured dtype, checks flags and offsets of the whole run with array
operations and returns the run as one event, so the Python work per call does
not grow with the number of pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from trimig.codec._wire import (
    BE32,
    BE64,
    Cursor,
    Incomplete,
    Malformed,
    ReceiveBuffer,
    as_byte_view,
    check_uint,
    decode_name,
    encode_counted,
)
from trimig.codec.constants import (
    PAGE_RECORD_SIZE,
    RAM_FLAGS_MASK,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    TARGET_PAGE_SIZE,
    ZERO_RECORD_SIZE,
    describe_ram_flags,
)
from trimig.codec.events import (
    RamBlockInfo,
    RamEndOfSection,
    RamMemSize,
    RamPages,
    RamWritten,
    RamZeroPages,
)
from trimig.errors import LocalProtocolError

if TYPE_CHECKING:
    from trimig.codec._wire import BytesLike

#: One ``PAGE`` record laid out in the stream: be64 word, then the page.
PAGE_RECORD_DTYPE = np.dtype([("hdr", ">u8"), ("data", np.uint8, (TARGET_PAGE_SIZE,))])
#: One ``ZERO`` record laid out in the stream: be64 word, then the fill byte.
ZERO_RECORD_DTYPE = np.dtype([("hdr", ">u8"), ("fill", np.uint8)])

_ADDR_MASK = np.uint64(0xFFFF_FFFF_FFFF_FFFF ^ RAM_FLAGS_MASK)
_FLAGS_MASK = np.uint64(RAM_FLAGS_MASK)
_PAGE_CONTINUE = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_PAGE_KINDS = (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_HOOK)
_FIRST_WINDOW = 64  # records checked before the run-scanning window grows
_RUN_MIN = 8  # shorter runs are decoded record by record (cheaper than numpy calls)

RamRecordEvent = RamPages | RamZeroPages | RamWritten | RamEndOfSection


# --- Encoding ------------------------------------------------------------------------


def _as_offsets(offsets: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    array = np.asarray(offsets)
    if array.ndim != 1:
        raise LocalProtocolError(f"page offsets must be a 1-D array, got shape {array.shape}")
    if array.size == 0:
        return np.empty(0, dtype=np.uint64)
    if array.dtype.kind not in "ui":
        raise LocalProtocolError(f"page offsets must be integers, got dtype {array.dtype}")
    if array.dtype.kind == "i" and int(array.min()) < 0:
        raise LocalProtocolError(f"negative page offset {int(array.min())}")
    result = array.astype(np.uint64, copy=False)
    misaligned = np.flatnonzero(result & _FLAGS_MASK)
    if misaligned.size:
        bad = int(result[misaligned[0]])
        raise LocalProtocolError(f"page offset {bad:#x} is not a multiple of {TARGET_PAGE_SIZE}")
    return result


def encode_end_of_section() -> bytes:
    """The EOS record that ends every RAM section body."""
    return BE64.pack(RAM_SAVE_FLAG_EOS)


def encode_mem_size(blocks: Sequence[RamBlockInfo], *, postcopy: bool) -> bytes:
    """The MEM_SIZE record: total bytes, then name and size of every block.

    With ``postcopy`` (the postcopy-ram capability), a block whose
    ``page_size`` is set and differs from TARGET_PAGE_SIZE also carries its
    page size.
    """
    parts = [b""]
    names: set[str] = set()
    total = 0
    for block in blocks:
        if block.name in names:
            raise LocalProtocolError(f"RAM block {block.name!r} listed twice")
        names.add(block.name)
        size = check_uint(block.size, 64, f"size of RAM block {block.name!r}")
        if size == 0 or size % TARGET_PAGE_SIZE:
            raise LocalProtocolError(
                f"size {size} of RAM block {block.name!r} is not a positive multiple of "
                f"{TARGET_PAGE_SIZE}"
            )
        total += size
        parts.append(encode_counted(block.name, "RAM block name"))
        parts.append(BE64.pack(size))
        if postcopy and block.page_size is not None and block.page_size != TARGET_PAGE_SIZE:
            _check_page_size(block.page_size, block.name, LocalProtocolError)
            parts.append(BE64.pack(block.page_size))
    parts[0] = BE64.pack(check_uint(total, 64, "total RAM size") | RAM_SAVE_FLAG_MEM_SIZE)
    return b"".join(parts)


def _check_page_size(page_size: int, name: str, error: type[Exception]) -> None:
    if page_size < TARGET_PAGE_SIZE or page_size & (page_size - 1):
        raise error(f"page size {page_size} of RAM block {name!r} is not a power of two >= 4096")


class RamRecordEncoder:
    """Encodes the RAM records of one channel, remembering its last block for CONTINUE."""

    def __init__(self) -> None:
        self.last_block: str | None = None

    def reset(self) -> None:
        """Forget the last block: the next record names its block (postcopy start, recovery)."""
        self.last_block = None

    def _named(self, block_name: str) -> bytes | None:
        """The counted name if the next record must name ``block_name``, else None."""
        name = encode_counted(block_name, "RAM block name")
        return None if block_name == self.last_block else name

    def encode_pages(
        self, block_name: str, offsets: npt.ArrayLike, source: BytesLike
    ) -> list[bytes | memoryview]:
        """PAGE records for ``offsets`` (bytes into the block) as a gather list.

        ``source`` is the block's memory; each payload is the memoryview slice
        ``source[offset:offset + TARGET_PAGE_SIZE]`` (no copy), so the pages must
        not change until the list has been sent.
        """
        offs = _as_offsets(offsets)
        count = len(offs)
        if count == 0:
            return []
        src = as_byte_view(source)
        top = int(offs.max())
        if top + TARGET_PAGE_SIZE > len(src):
            raise LocalProtocolError(
                f"page offset {top:#x} of block {block_name!r} lies past the end of its "
                f"{len(src)}-byte source buffer"
            )
        name = self._named(block_name)
        words = offs | np.uint64(_PAGE_CONTINUE)
        if name is not None:
            words[0] ^= np.uint64(RAM_SAVE_FLAG_CONTINUE)
        headers = memoryview(words.astype(">u8").tobytes())
        out: list[bytes | memoryview] = [b""] * (2 * count)
        out[0::2] = [headers[i : i + 8] for i in range(0, 8 * count, 8)]
        out[1::2] = [src[o : o + TARGET_PAGE_SIZE] for o in offs.tolist()]
        if name is not None:
            out[0] = bytes(headers[0:8]) + name
        self.last_block = block_name
        return out

    def encode_page(
        self, block_name: str, offset: int, source: BytesLike
    ) -> list[bytes | memoryview]:
        """One PAGE record (an urgent page): the bytes of ``encode_pages`` for
        ``[offset]``, without its array work; the payload is a memoryview slice of
        ``source`` (no copy)."""
        src = as_byte_view(source)
        if offset < 0 or offset % TARGET_PAGE_SIZE or offset + TARGET_PAGE_SIZE > len(src):
            raise LocalProtocolError(
                f"page offset {offset:#x} of block {block_name!r} is not a page of its "
                f"{len(src)}-byte source buffer"
            )
        if block_name == self.last_block:
            header = BE64.pack(offset | _PAGE_CONTINUE)
        else:
            header = BE64.pack(offset | RAM_SAVE_FLAG_PAGE) + encode_counted(
                block_name, "RAM block name"
            )
            self.last_block = block_name
        return [header, src[offset : offset + TARGET_PAGE_SIZE]]

    def encode_zero_page(self, block_name: str, offset: int) -> bytes:
        """One ZERO record: the bytes of ``encode_zero_pages`` for ``[offset]``."""
        if not 0 <= offset < 1 << 64 or offset % TARGET_PAGE_SIZE:
            raise LocalProtocolError(f"page offset {offset:#x} is not a page's")
        if block_name == self.last_block:
            return BE64.pack(offset | _ZERO_CONTINUE) + b"\0"
        name = encode_counted(block_name, "RAM block name")
        self.last_block = block_name
        return BE64.pack(offset | RAM_SAVE_FLAG_ZERO) + name + b"\0"

    def encode_pages_gather(
        self, block_name: str, offsets: npt.ArrayLike, source: BytesLike, source_offset: int = 0
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint64]]:
        """PAGE records for ``offsets`` as a raw gather array: no Python object per page.

        Returns ``(headers, entries)``. ``headers`` holds the records' headers back to
        back (the first one followed by the block name when it must be named);
        ``entries`` is a ``(2 * n, 2)`` uint64 array of ``struct iovec`` (address,
        length): record i's header in ``headers``, then its page in ``source`` (the
        block's memory). The bytes are the same as :meth:`encode_pages` gives; keep
        ``headers`` and ``source`` alive and unchanged until the entries are written.
        """
        offs = _as_offsets(offsets)
        count = len(offs)
        if count == 0:
            return np.empty(0, dtype=np.uint8), np.empty((0, 2), dtype=np.uint64)
        memory = np.frombuffer(as_byte_view(source), dtype=np.uint8)
        top = int(offs.max())
        if top + TARGET_PAGE_SIZE > source_offset + len(memory) or int(offs.min()) < source_offset:
            raise LocalProtocolError(
                f"page offsets {int(offs.min()):#x}..{top:#x} of block {block_name!r} lie "
                f"outside its {len(memory)}-byte source buffer at {source_offset:#x}"
            )
        name = self._named(block_name) or b""
        words = (offs | np.uint64(_PAGE_CONTINUE)).astype(">u8")
        if name:
            words[0] ^= RAM_SAVE_FLAG_CONTINUE
        raw = words.view(np.uint8)
        headers = np.empty(8 * count + len(name), dtype=np.uint8)
        headers[:8] = raw[:8]
        headers[8 : 8 + len(name)] = np.frombuffer(name, dtype=np.uint8)
        headers[8 + len(name) :] = raw[8:]
        entries = np.empty((count, 2, 2), dtype=np.uint64)
        header_starts = np.arange(count, dtype=np.uint64) * np.uint64(8)
        header_starts[1:] += np.uint64(len(name))
        entries[:, 0, 0] = header_starts + np.uint64(headers.ctypes.data)
        entries[:, 0, 1] = 8
        entries[0, 0, 1] = 8 + len(name)
        entries[:, 1, 0] = offs + np.uint64(memory.ctypes.data - source_offset)
        entries[:, 1, 1] = TARGET_PAGE_SIZE
        self.last_block = block_name
        return headers, entries.reshape(-1, 2)

    def encode_zero_pages(self, block_name: str, offsets: npt.ArrayLike) -> bytes:
        """ZERO records for ``offsets`` (pages that are entirely zero)."""
        offs = _as_offsets(offsets)
        if len(offs) == 0:
            return b""
        name = self._named(block_name)
        records = np.zeros(len(offs), dtype=ZERO_RECORD_DTYPE)
        records["hdr"] = offs | np.uint64(_ZERO_CONTINUE)
        self.last_block = block_name
        if name is None:
            return records.tobytes()
        first = BE64.pack(int(offs[0]) | RAM_SAVE_FLAG_ZERO) + name + b"\0"
        return first + records[1:].tobytes()

    def encode_written(self, block_name: str, offset: int, npages: int) -> bytes:
        """A HOOK record: ``npages`` pages from ``offset`` were written one-sided."""
        offset = check_uint(offset, 64, "HOOK offset")
        npages = check_uint(npages, 32, "HOOK page count")
        if offset % TARGET_PAGE_SIZE:
            raise LocalProtocolError(f"HOOK offset {offset:#x} is not page-aligned")
        if npages == 0:
            raise LocalProtocolError("HOOK record with zero pages")
        name = self._named(block_name)
        self.last_block = block_name
        if name is None:
            word = offset | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_CONTINUE
            return BE64.pack(word) + BE32.pack(npages)
        return BE64.pack(offset | RAM_SAVE_FLAG_HOOK) + name + BE32.pack(npages)

    def encode_end_of_section(self) -> bytes:
        """EOS (the last block is kept: QEMU keeps it across sections)."""
        return encode_end_of_section()


# --- Decoding ------------------------------------------------------------------------


class RamRecordDecoder:
    """Decoding state of the RAM records of one channel.

    ``blocks`` maps block names to sizes (from MEM_SIZE, or given for a raw
    channel); ``last_block`` is the block CONTINUE refers to.
    """

    def __init__(
        self,
        blocks: Mapping[str, int] | None = None,
        *,
        local_page_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.blocks: dict[str, int] = dict(blocks or {})
        self.local_page_sizes: dict[str, int] = dict(local_page_sizes or {})
        self.last_block: str | None = None
        self.postcopy_advised = False

    def copy(self) -> RamRecordDecoder:
        """Same blocks and postcopy state for another channel (no last block)."""
        other = RamRecordDecoder(self.blocks, local_page_sizes=self.local_page_sizes)
        other.postcopy_advised = self.postcopy_advised
        return other

    def decode_mem_size(self, buffer: ReceiveBuffer) -> tuple[RamMemSize, int]:
        """Decode the MEM_SIZE record at the buffer start; learn its block list."""
        cursor = Cursor(buffer, "RAM MEM_SIZE record")
        word = cursor.be64()
        flags = word & RAM_FLAGS_MASK
        if flags != RAM_SAVE_FLAG_MEM_SIZE:
            raise Malformed(
                "the RAM START section must begin with a MEM_SIZE record, "
                f"got flags {flags:#x} ({describe_ram_flags(flags)})"
            )
        total = word ^ flags
        blocks: list[RamBlockInfo] = []
        names: set[str] = set()
        seen = 0
        while seen < total:
            name = decode_name(cursor.counted(), "RAM block name")
            if name in names:
                raise Malformed(f"RAM block {name!r} listed twice in MEM_SIZE")
            names.add(name)
            size = cursor.be64()
            if size == 0 or size % TARGET_PAGE_SIZE:
                raise Malformed(
                    f"size {size:#x} of RAM block {name!r} is not a positive multiple of "
                    f"{TARGET_PAGE_SIZE}"
                )
            seen += size
            if seen > total:
                raise Malformed(f"RAM block sizes add up to more than the MEM_SIZE total {total}")
            page_size = None
            if self.postcopy_advised and self.local_page_sizes.get(name, TARGET_PAGE_SIZE) != (
                TARGET_PAGE_SIZE
            ):
                page_size = cursor.be64()
                _check_page_size(page_size, name, Malformed)
            blocks.append(RamBlockInfo(name, size, page_size))
        self.blocks = {block.name: block.size for block in blocks}
        return RamMemSize(total, tuple(blocks)), cursor.used

    def decode(self, buffer: ReceiveBuffer) -> tuple[RamRecordEvent, int]:
        """Decode the record (or run of records) at the buffer start.

        Returns the event and the number of bytes it used. Raises Incomplete
        when the buffer ends inside the record, Malformed on bad input.
        """
        view = buffer.view
        start = buffer.start
        available = buffer.end - start
        if available < 8:
            raise Incomplete("a RAM record")
        word: int = BE64.unpack_from(view, start)[0]
        flags = word & RAM_FLAGS_MASK
        block = self.last_block
        if flags in (_PAGE_CONTINUE, _ZERO_CONTINUE) and block is not None:
            size = self.blocks[block]
            offset = word ^ flags
            if flags == _PAGE_CONTINUE:
                nrecords = available // PAGE_RECORD_SIZE
                if nrecords >= _RUN_MIN and size >= TARGET_PAGE_SIZE:
                    ahead = start + (_RUN_MIN - 1) * PAGE_RECORD_SIZE
                    if BE64.unpack_from(view, ahead)[0] & RAM_FLAGS_MASK == flags:
                        pages = self._page_run(buffer, block, size, nrecords)
                        if pages is not None:
                            return pages
                if nrecords and offset + TARGET_PAGE_SIZE <= size:
                    data = buffer.array[start + 8 : start + PAGE_RECORD_SIZE]
                    offsets = np.array([offset], dtype=np.uint64)
                    page = RamPages(block, offsets, data.reshape(1, TARGET_PAGE_SIZE))
                    return page, PAGE_RECORD_SIZE
            else:
                nrecords = available // ZERO_RECORD_SIZE
                if nrecords >= _RUN_MIN and size >= TARGET_PAGE_SIZE:
                    ahead = start + (_RUN_MIN - 1) * ZERO_RECORD_SIZE
                    if BE64.unpack_from(view, ahead)[0] & RAM_FLAGS_MASK == flags:
                        zeros = self._zero_run(buffer, block, size, nrecords)
                        if zeros is not None:
                            return zeros
                if nrecords and offset + TARGET_PAGE_SIZE <= size and view[start + 8] == 0:
                    offsets = np.array([offset], dtype=np.uint64)
                    return RamZeroPages(block, offsets), ZERO_RECORD_SIZE
        return self._decode_one(buffer, word, flags)

    @staticmethod
    def _scan_run(
        headers: npt.NDArray[np.uint64],
        flags: int,
        size: int,
        fills: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint64]:
        """The words of the leading run of ``headers`` whose flags are exactly
        ``flags``, whose page lies inside a block of ``size`` bytes and (for
        ZERO records) whose fill byte is 0. Scans in growing windows, so the
        work is proportional to the run, not to the buffer."""
        # With the flags equal, "offset + page <= size" is "word <= size - page + flags".
        last = np.uint64(size - TARGET_PAGE_SIZE + flags)
        chunks = []
        count = 0
        window = _FIRST_WINDOW
        total = len(headers)
        while count < total:
            stop = min(total, count + window)
            words = headers[count:stop].astype(np.uint64)
            good = ((words & _FLAGS_MASK) == flags) & (words <= last)
            if fills is not None:
                good &= fills[count:stop] == 0
            if not good.all():
                chunks.append(words[: int(np.argmin(good))])
                break
            chunks.append(words)
            count = stop
            window *= 4
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _page_run(
        self, buffer: ReceiveBuffer, block: str, size: int, nrecords: int
    ) -> tuple[RamPages, int] | None:
        start = buffer.start
        records = buffer.array[start : start + nrecords * PAGE_RECORD_SIZE].view(PAGE_RECORD_DTYPE)
        words = self._scan_run(records["hdr"], _PAGE_CONTINUE, size)
        count = len(words)
        if count == 0:
            return None
        pages = RamPages(block, words & _ADDR_MASK, records["data"][:count])
        return pages, count * PAGE_RECORD_SIZE

    def _zero_run(
        self, buffer: ReceiveBuffer, block: str, size: int, nrecords: int
    ) -> tuple[RamZeroPages, int] | None:
        start = buffer.start
        records = buffer.array[start : start + nrecords * ZERO_RECORD_SIZE].view(ZERO_RECORD_DTYPE)
        words = self._scan_run(records["hdr"], _ZERO_CONTINUE, size, records["fill"])
        if len(words) == 0:
            return None
        return RamZeroPages(block, words & _ADDR_MASK), len(words) * ZERO_RECORD_SIZE

    def _decode_one(
        self, buffer: ReceiveBuffer, word: int, flags: int
    ) -> tuple[RamRecordEvent, int]:
        offset = word ^ flags
        if flags == RAM_SAVE_FLAG_EOS:
            if offset:
                raise Malformed(f"EOS record with offset bits {offset:#x} set")
            return RamEndOfSection(), 8
        if flags == RAM_SAVE_FLAG_MEM_SIZE:
            raise Malformed("MEM_SIZE record outside the start of the RAM START section")
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind not in _PAGE_KINDS:
            raise Malformed(
                f"unsupported RAM record flags {flags:#x} ({describe_ram_flags(flags)})"
            )
        cursor = Cursor(buffer, f"RAM {describe_ram_flags(kind)} record")
        cursor.pos += 8
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if self.last_block is None:
                raise Malformed("RAM record with CONTINUE but no previous block on this channel")
            block = self.last_block
        else:
            block = decode_name(cursor.counted(), "RAM block name")
            if block not in self.blocks:
                known = ", ".join(repr(name) for name in self.blocks) or "none"
                raise Malformed(f"RAM record names unknown block {block!r} (known: {known})")
        size = self.blocks[block]
        npages = cursor.be32() if kind == RAM_SAVE_FLAG_HOOK else 1
        if npages == 0:
            raise Malformed("HOOK record with zero pages")
        if offset + npages * TARGET_PAGE_SIZE > size:
            raise Malformed(
                f"Illegal RAM offset {offset:#x} (+{npages} pages) in block {block!r} "
                f"of size {size:#x}"
            )
        event: RamRecordEvent
        if kind == RAM_SAVE_FLAG_PAGE:
            at = cursor.skip(TARGET_PAGE_SIZE)
            pages = buffer.array[at : at + TARGET_PAGE_SIZE].reshape(1, TARGET_PAGE_SIZE)
            event = RamPages(block, np.array([offset], dtype=np.uint64), pages)
        elif kind == RAM_SAVE_FLAG_ZERO:
            fill = cursor.u8()
            if fill:
                raise Malformed(f"ZERO page record with fill byte {fill:#x} (must be 0)")
            event = RamZeroPages(block, np.array([offset], dtype=np.uint64))
        else:
            event = RamWritten(block, offset, npages)
        self.last_block = block
        return event, cursor.used
