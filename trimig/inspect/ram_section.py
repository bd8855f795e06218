"""The RAM section of a saved stream, and the walker's lowest layer (position and cursor).

:class:`RamWalker` holds the whole walk's state (shared by the layers above it in
``sections.py`` and ``walker.py``) and reads a RAM section's body: its records of every kind
QEMU and trimig send (PAGE, ZERO, XBZRLE, zlib COMPRESS_PAGE, HOOK, MULTIFD_FLUSH), the
MEM_SIZE list of blocks and mapped-ram's fixed-offset layout, counting each block's pages
in its :class:`~trimig.inspect.report.RamBlock` and handing them to the extractor.

Contract: a method starts at ``self.pos``, leaves ``self.pos`` after what it read, and
raises Incomplete or Malformed (reported at ``self.record_start``) or :class:`BadAt`.
"""

from __future__ import annotations

import mmap
import zlib

import numpy as np

from trimig.codec._wire import BE64, Cursor, Incomplete, Malformed, decode_name
from trimig.codec.constants import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    describe_ram_flags,
)
from trimig.inspect.extract import RamExtractor
from trimig.inspect.report import MappedRam, RamBlock, StreamReport
from trimig.inspect.vmdesc import VmDescription

#: mapped-ram (QEMU 9.0): the header after each MEM_SIZE entry.
MAPPED_RAM_HEADER_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28
#: The mapped-ram bitmap is an array of the host's unsigned longs (x86-64: 8 bytes).
MAPPED_RAM_BITMAP_WORD = 8
#: XBZRLE: the encoding byte after the block name.
ENCODING_FLAG_XBZRLE = 0x01
#: A zlib stream of one page is at most this much longer than the page (compressBound).
ZLIB_OVERHEAD = 64


class FileCursor(Cursor):
    """The codec's field cursor over a file mapping: positions are file offsets."""

    def __init__(self, view: memoryview, pos: int, end: int, what: str) -> None:
        self.view = view
        self.pos = self._begin = pos
        self.end = end
        self.what = what


class BadAt(Exception):
    """Malformed input at a given offset (Malformed is at the current record's start)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class RamWalker:
    """The walk's state over ``view[start:end]`` and the RAM section's reading."""

    def __init__(
        self,
        data: mmap.mmap | bytes,
        view: memoryview,
        start: int,
        end: int,
        report: StreamReport,
        extractor: RamExtractor | None,
    ) -> None:
        self.data = data
        self.view = view
        self.pos = start
        self.end = end
        self.file_end = end
        self.report = report
        self.extractor = extractor
        self.record_start = start
        self.tps = 4096
        self.trimig = False
        self.ignore_shared = False
        self.mapped_ram = False
        self.advised_summary: int | None = None
        self.last_block: RamBlock | None = None
        self.ram_section: int | None = None
        self.package: tuple[int, int] | None = None  # (offset, end) of the PACKAGED blob
        self.vmdesc: VmDescription | None = None

    def cursor(self, what: str, pos: int | None = None) -> FileCursor:
        return FileCursor(self.view, self.pos if pos is None else pos, self.end, what)

    def begin(self, pos: int | None = None) -> int:
        """Start a record at ``pos`` (default: the current position)."""
        self.record_start = self.pos if pos is None else pos
        return self.record_start

    # --- RAM ------------------------------------------------------------------------

    def _ram_body(self) -> None:
        """RAM records up to EOS."""
        tps = self.tps
        mask = tps - 1
        view = self.view
        report = self.report
        extractor = self.extractor
        while True:
            if self.begin() >= self.end:
                raise Incomplete("a RAM section body (between records, before its EOS)")
            cursor = self.cursor("a RAM record")
            word = cursor.be64()
            flags = word & mask
            offset = word & ~mask
            if flags & RAM_SAVE_FLAG_MEM_SIZE:
                if flags != RAM_SAVE_FLAG_MEM_SIZE:
                    raise Malformed(f"RAM record flags {flags:#x} ({describe_ram_flags(flags)})")
                self.pos = cursor.pos
                self._mem_size(offset)
                continue
            base = flags & ~RAM_SAVE_FLAG_CONTINUE
            if base == RAM_SAVE_FLAG_EOS:
                self.pos = cursor.pos
                return
            if base == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                report.multifd_flushes += 1
                self.pos = cursor.pos
                continue
            if base == RAM_SAVE_FLAG_HOOK and not self.trimig:
                report.rdma_hooks += 1  # QEMU's RDMA: the pages went over RDMA, not here
                self.pos = cursor.pos
                continue
            if base not in (
                RAM_SAVE_FLAG_PAGE,
                RAM_SAVE_FLAG_ZERO,
                RAM_SAVE_FLAG_XBZRLE,
                RAM_SAVE_FLAG_COMPRESS_PAGE,
                RAM_SAVE_FLAG_HOOK,
            ):
                raise Malformed(
                    f"unsupported RAM record flags {flags:#x} ({describe_ram_flags(flags)})"
                )
            if self.mapped_ram:
                raise Malformed(
                    f"RAM record {describe_ram_flags(flags)} in a mapped-ram stream (its pages "
                    "are at fixed offsets)"
                )
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = self.last_block
                if block is None:
                    raise Malformed("CONTINUE but no previous block")
            else:
                block = self._named_block(cursor)
            pages = 1
            if base == RAM_SAVE_FLAG_HOOK:
                pages = cursor.be32()
                if pages < 1:
                    raise Malformed("HOOK record for 0 pages")
            if offset + pages * tps > block.size:
                raise Malformed(
                    f"Illegal RAM offset {offset:#x} in block {block.name!r} of size "
                    f"{block.size:#x}"
                )
            self.last_block = block
            index = offset // tps
            if base == RAM_SAVE_FLAG_PAGE:
                data_at = cursor.skip(tps)
                block.normal += 1
                if extractor is not None:
                    extractor.page(block.name, offset, view[data_at : data_at + tps])
            elif base == RAM_SAVE_FLAG_ZERO:
                fill = cursor.u8()
                block.zero += 1
                if fill:
                    block.nonzero_fill += 1
                if extractor is not None:
                    extractor.zero(block.name, offset, fill)
            elif base == RAM_SAVE_FLAG_XBZRLE:
                encoding = cursor.u8()
                if encoding != ENCODING_FLAG_XBZRLE:
                    raise Malformed(f"XBZRLE page with encoding byte {encoding:#04x}")
                length = cursor.be16()
                if length > tps:
                    raise Malformed(f"XBZRLE page of {length} bytes (at most {tps})")
                encoded = cursor.take(length)
                page = bytearray(
                    extractor.read(block.name, offset) if extractor is not None else tps
                )
                apply_xbzrle(page, encoded)
                block.xbzrle += 1
                if extractor is not None:
                    extractor.page(block.name, offset, page)
            elif base == RAM_SAVE_FLAG_COMPRESS_PAGE:
                length = cursor.be32()
                if length > tps + ZLIB_OVERHEAD:
                    raise Malformed(f"compressed page of {length} bytes")
                try:
                    page_bytes = zlib.decompress(cursor.take(length))
                except zlib.error as exc:
                    raise Malformed(f"compressed page does not decompress ({exc})") from None
                if len(page_bytes) != tps:
                    raise Malformed(f"compressed page of {len(page_bytes)} bytes, not {tps}")
                block.compressed += 1
                if extractor is not None:
                    extractor.page(block.name, offset, page_bytes)
            else:
                block.hook += pages
            block.sent[index : index + pages] = b"\x01" * pages
            self.pos = cursor.pos

    def _named_block(self, cursor: Cursor) -> RamBlock:
        name = decode_name(cursor.counted(), "RAM block name")
        block = self.report.blocks.get(name)
        if block is None:
            known = ", ".join(repr(known) for known in self.report.blocks) or "none"
            raise Malformed(f"unknown RAM block {name!r} (known: {known})")
        return block

    def _mem_size(self, total: int) -> None:
        """The MEM_SIZE list of RAM blocks (the word is read)."""
        report = self.report
        report.ram_total = total
        remaining = total
        listed: set[str] = set()
        while remaining > 0:
            self.begin()
            cursor = self.cursor("a MEM_SIZE entry")
            name = decode_name(cursor.counted(), "RAM block name")
            size = cursor.be64()
            if name in listed:
                raise Malformed(f"MEM_SIZE lists RAM block {name!r} twice")
            if size > remaining:
                raise Malformed(
                    f"RAM block {name!r} of {size} bytes: the sizes add up past the total {total}"
                )
            listed.add(name)
            remaining -= size
            page_size = self._mem_size_page_size(cursor)
            gpa = cursor.be64() if self.ignore_shared else None
            pages = -(-size // self.tps)
            block = report.blocks.get(name)
            if block is None or block.size != size:
                block = RamBlock(name, size, pages, sent=bytearray(pages))
                report.blocks[name] = block
            block.page_size, block.gpa = page_size, gpa
            if self.extractor is not None:
                self.extractor.open_block(name, size)
            self.pos = cursor.pos
            if self.mapped_ram:
                self._mapped_ram(block)

    def _mem_size_page_size(self, cursor: Cursor) -> int | None:
        """After POSTCOPY_ADVISE a hugepage block's entry carries its page size. Whether it
        does depends on the destination's own page size, which a file does not say: a
        be64 power of two of at least the target page size is taken for one (a block
        name cannot start with a zero byte, nor EOS or a guest address, usually, be one)."""
        if self.advised_summary is None or self.advised_summary == self.tps:
            return None
        if cursor.available < 8:
            return None
        value: int = BE64.unpack_from(self.view, cursor.pos)[0]
        if value < self.tps or value & (value - 1) or value > 1 << 34:
            return None
        cursor.pos += 8
        return value

    def _mapped_ram(self, block: RamBlock) -> None:
        """A block's mapped-ram header, its bitmap and its pages; the stream goes on after
        the pages (``pages_offset + size``)."""
        start = self.begin()
        cursor = self.cursor(f"the mapped-ram header of RAM block {block.name!r}")
        version = cursor.be32()
        if version != MAPPED_RAM_HEADER_VERSION:
            raise BadAt(
                f"mapped-ram header of RAM block {block.name!r}: layout version {version} "
                f"(only {MAPPED_RAM_HEADER_VERSION} is known)",
                start,
            )
        page_size = cursor.be64()
        if page_size != self.tps:
            raise BadAt(
                f"mapped-ram header of RAM block {block.name!r}: page size differs: "
                f"{page_size}, the stream's is {self.tps}",
                start + 4,
            )
        bitmap_offset = cursor.be64()
        pages_offset = cursor.be64()
        self.pos = cursor.pos
        bitmap_size = -(-block.page_count // (8 * MAPPED_RAM_BITMAP_WORD)) * (
            MAPPED_RAM_BITMAP_WORD
        )
        block.mapped_ram = MappedRam(
            start, version, page_size, bitmap_offset, pages_offset, bitmap_size
        )
        if bitmap_offset == 0 and pages_offset == 0:
            return  # an x-ignore-shared block: no space in the file
        if pages_offset % self.tps:
            raise BadAt(
                f"mapped-ram header of RAM block {block.name!r}: pages offset {pages_offset:#x} "
                f"is not a multiple of the page size {self.tps}",
                start + 20,
            )
        if bitmap_offset < self.pos or pages_offset < self.pos:
            raise BadAt(
                f"mapped-ram header of RAM block {block.name!r}: bitmap offset "
                f"{bitmap_offset:#x} or pages offset {pages_offset:#x} lies before the header",
                start + 12,
            )
        if bitmap_offset + bitmap_size > self.end:
            self.record_start = bitmap_offset
            raise Incomplete(f"the mapped-ram bitmap of RAM block {block.name!r}")
        if pages_offset + block.size > self.end:
            self.record_start = pages_offset
            raise Incomplete(f"the mapped-ram pages of RAM block {block.name!r}")
        bits = np.frombuffer(self.view[bitmap_offset : bitmap_offset + bitmap_size], np.uint8)
        present = np.flatnonzero(np.unpackbits(bits, bitorder="little")[: block.page_count])
        block.normal = len(present)
        block.zero = block.page_count - block.normal
        block.sent[:] = b"\x01" * block.page_count
        if self.extractor is not None:
            for index in present.tolist():
                at = pages_offset + index * self.tps
                self.extractor.page(block.name, index * self.tps, self.view[at : at + self.tps])
        self.pos = pages_offset + block.size


def apply_xbzrle(page: bytearray, encoded: bytes) -> None:
    """Apply an XBZRLE delta: pairs of (ULEB128 length of an unchanged run, ULEB128 length
    of a changed run and its new bytes). Raises Malformed for a delta that does not fit."""
    size = len(page)
    at = done = 0
    while at < len(encoded):
        first = at == 0
        unchanged, at = _uleb128(encoded, at)
        if not first and not unchanged:
            raise Malformed("XBZRLE delta with an empty unchanged run")
        done += unchanged
        changed, at = _uleb128(encoded, at)
        if not changed or done + changed > size or at + changed > len(encoded):
            raise Malformed("XBZRLE delta that does not fit the page")
        page[done : done + changed] = encoded[at : at + changed]
        done += changed
        at += changed


def _uleb128(data: bytes, at: int) -> tuple[int, int]:
    """A ULEB128 number of at most two bytes (QEMU's XBZRLE uses no longer ones)."""
    if at >= len(data):
        raise Malformed("XBZRLE delta cut short")
    value = data[at] & 0x7F
    if not data[at] & 0x80:
        return value, at + 1
    if at + 1 >= len(data) or data[at + 1] & 0x80:
        raise Malformed("XBZRLE delta with a bad length")
    return value | data[at + 1] << 7, at + 2
