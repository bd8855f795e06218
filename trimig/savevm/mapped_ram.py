"""The source's mapped-ram writer: RAM pages at fixed offsets of a ``file:`` stream.

The second RAM writer beside ``RamSaver``'s record sender (``docs/snapshots.md``). The
MEM_SIZE list carries each block's header and leaves room in the file for its bitmap and
page slots; ``RamSaver.queue_window`` then hands each window here instead of encoding
records: data pages are pwritten into their slots (so a page dirtied again overwrites its
own place and the file never outgrows RAM), zero pages are not written, only their bit
cleared. The bitmaps go out once, at completion, before the END section's EOS (QEMU's
``ram_save_complete``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import codec
from ..channel import MigrationChannel
from ..codec._wire import BE64
from ..codec.constants import RAM_SAVE_FLAG_MEM_SIZE, TARGET_PAGE_SIZE
from ..codec.mapped_ram import (
    BlockLayout,
    block_layout,
    encode_capabilities_subsection,
    encode_mapped_ram_header,
    encode_mem_size_entry,
)
from ..errors import ConfigError
from ..kernel.iov import write_at, write_rows_at
from ..ram_blocks import RamBlock
from ..transports import ByteStream, FileStream


def check_transport(stream: ByteStream, *, mapped_ram: bool, postcopy: bool, uri: str) -> None:
    """QEMU's migration_channels_and_transport_compatible, for what trimig supports."""
    is_file = isinstance(stream, FileStream)
    if mapped_ram and not is_file:
        raise ConfigError(f"Migration requires seekable transport (e.g. file): {uri!r}")
    if postcopy and is_file:
        raise ConfigError(f"postcopy-ram cannot work over {uri!r}: a file has no return path")


def configuration(*, mapped_ram: bool) -> bytes:
    """The configuration section, with ``configuration/capabilities`` for mapped-ram."""
    section = codec.encode_configuration()
    if mapped_ram:
        section += encode_capabilities_subsection(["mapped-ram"])
    return section


class MappedRamWriter:
    """Writes one migration's pages into their slots of the file behind ``stream``."""

    def __init__(self, stream: FileStream, blocks: Sequence[RamBlock]) -> None:
        self._stream = stream
        self._blocks = list(blocks)
        self.layouts: dict[str, BlockLayout] = {}
        #: One bool per target page: the page's slot holds its data (the bitmap's bits).
        self.present = {b.name: np.zeros(b.spec.target_pages, dtype=bool) for b in blocks}
        #: Page bytes pwritten into slots.
        self.bytes_written = 0

    async def put_mem_size(self, channel: MigrationChannel) -> None:
        """The MEM_SIZE list, each entry followed by its header; the stream goes on after
        the last block's page slots. Flushes ``channel``, whose stream is ours."""
        total = sum(block.size for block in self._blocks)
        channel.put(BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE))
        for block in self._blocks:
            channel.put(encode_mem_size_entry(block.name, block.size))
            await channel.flush()
            layout = block_layout(self._stream.position, block.size, TARGET_PAGE_SIZE)
            self.layouts[block.name] = layout
            channel.put(encode_mapped_ram_header(TARGET_PAGE_SIZE, layout))
            await channel.flush()
            self._stream.seek(layout.end)

    def write_window(
        self,
        block: RamBlock,
        pages: np.ndarray,
        is_zero: np.ndarray,
        source: np.ndarray,
        source_first: int,
    ) -> int:
        """Pages ``pages`` (sorted target page indices) of ``block``, read into ``source``
        (whose row 0 is page ``source_first``): pwrite the data ones into their slots (one
        pwritev per run), clear the zero ones' bits. Returns the page bytes written."""
        layout = self.layouts[block.name]
        present = self.present[block.name]
        present[pages[is_zero]] = False
        data = pages[~is_zero]
        if len(data) == 0:
            return 0
        breaks = np.flatnonzero(np.diff(data) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(data)])).tolist()
        fd = self._stream.fd
        for start, end in zip(starts, ends, strict=True):
            first = int(data[start])
            count = end - start
            write_rows_at(
                fd,
                layout.pages_offset + first * TARGET_PAGE_SIZE,
                source[first - source_first : first - source_first + count],
            )
        present[data] = True
        written = len(data) * TARGET_PAGE_SIZE
        self.bytes_written += written
        return written

    def write_bitmaps(self) -> None:
        """pwrite every block's bitmap at its offset (little-endian bit order)."""
        fd = self._stream.fd
        for block in self._blocks:
            layout = self.layouts[block.name]
            bits = np.packbits(self.present[block.name], bitorder="little").tobytes()
            write_at(fd, bits.ljust(layout.bitmap_size, b"\0"), layout.bitmap_offset)
