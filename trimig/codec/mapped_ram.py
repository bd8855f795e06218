"""mapped-ram (QEMU 9.0): the fixed-offset file layout of RAM, as bytes and offsets.

With the ``mapped-ram`` capability a stream saved to a file carries no page records. Each
MEM_SIZE entry (name, size) is followed by a 28-byte big-endian header::

    be32 version (1)  be64 page size  be64 bitmap offset  be64 pages offset

then, at those absolute file offsets, the block's bitmap (one bit per target page, set =
the page is in its slot; the host's unsigned longs, little-endian bit order on x86) and its
page slots (page ``i`` at ``pages offset + i * page size``). The pages offset is rounded up
to 1 MiB; the stream goes on at ``pages offset + block size``. The configuration section
says the capability is on (subsection ``configuration/capabilities``).

Sans-io: encoders return bytes, :func:`block_layout` returns offsets; the writer is
``savevm/mapped_ram.py``, the reader ``snapshot/file.py`` (through ``inspect/``).
"""

from __future__ import annotations

import struct

import attrs

from trimig.codec._wire import BE32, encode_counted
from trimig.codec.constants import SectionType

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_HEADER_SIZE = MAPPED_RAM_HEADER.size  # 28
#: Page slots start at a multiple of this (QEMU's MAPPED_RAM_FILE_OFFSET_ALIGNMENT).
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20
#: The bitmap is an array of the host's unsigned longs (x86-64: 8 bytes).
MAPPED_RAM_BITMAP_WORD = 8
#: QEMU's vmstate_capabilites version.
CAPABILITIES_SUBSECTION_VERSION = 1


def bitmap_size(pages: int) -> int:
    """Bytes of a block's bitmap: whole unsigned longs, one bit per target page."""
    bits = 8 * MAPPED_RAM_BITMAP_WORD
    return -(-pages // bits) * MAPPED_RAM_BITMAP_WORD


@attrs.frozen
class BlockLayout:
    """Where one block's header, bitmap and page slots lie in the file (absolute offsets)."""

    header_offset: int
    bitmap_offset: int
    bitmap_size: int
    pages_offset: int
    size: int

    @property
    def end(self) -> int:
        """Where the stream goes on after this block."""
        return self.pages_offset + self.size


def block_layout(header_offset: int, size: int, page_size: int) -> BlockLayout:
    """The layout of a block of ``size`` bytes whose header starts at ``header_offset``."""
    bitmap_offset = header_offset + MAPPED_RAM_HEADER_SIZE
    length = bitmap_size(size // page_size)
    align = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    pages_offset = -(-(bitmap_offset + length) // align) * align
    return BlockLayout(header_offset, bitmap_offset, length, pages_offset, size)


def encode_mapped_ram_header(page_size: int, layout: BlockLayout) -> bytes:
    """The 28-byte header that follows a block's MEM_SIZE entry."""
    return MAPPED_RAM_HEADER.pack(
        MAPPED_RAM_HDR_VERSION, page_size, layout.bitmap_offset, layout.pages_offset
    )


def encode_mem_size_entry(name: str, size: int) -> bytes:
    """One block of the MEM_SIZE list (counted name, be64 size), without the total word."""
    return encode_counted(name, "RAM block name") + struct.pack(">Q", size)


def encode_capabilities_subsection(capabilities: list[str]) -> bytes:
    """``configuration/capabilities``: 0x05, its name, be32 version, be32 count, the
    capability names (counted strings); it follows the machine type in the configuration
    section."""
    body = BE32.pack(len(capabilities)) + b"".join(
        encode_counted(name, "capability name") for name in capabilities
    )
    return (
        bytes((SectionType.SUBSECTION,))
        + encode_counted("configuration/capabilities", "subsection name")
        + BE32.pack(CAPABILITIES_SUBSECTION_VERSION)
        + body
    )
