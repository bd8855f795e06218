"""A mapped-ram snapshot file, opened for a restore: where each block's pages lie.

:func:`open_snapshot` walks the file with the inspector (``trimig/inspect/``, which checks
the layout: truncation, layout version, page size, offsets, each error naming its file
offset), then insists on what a restore needs: a complete trimig stream with the
``mapped-ram`` capability, every block with its header, one device state. The bitmaps
are read into numpy arrays; the pages stay in the file until a restore reads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs
import numpy as np

from ..codec.constants import TARGET_PAGE_SIZE
from ..codec.mapped_ram import BlockLayout
from ..errors import ConfigError, RemoteProtocolError
from ..inspect.walker import inspect_file
from ..kernel.iov import read_at
from ..ram_blocks import RamBlockSpec

#: The machine type of trimig's streams: only its guests' device state can be restored.
TRIMIG_MACHINE = "trimig"
GUEST_SECTION = "guest"


class BadSnapshot(RemoteProtocolError):
    """The file is not a snapshot trimig can restore; ``offset`` is where, if known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} at offset {offset}")
        self.offset = offset


class NotMappedRam(BadSnapshot):
    """A well-formed stream without the mapped-ram layout (restore it as a stream)."""


@attrs.frozen
class SnapshotBlock:
    name: str
    size: int
    layout: BlockLayout
    #: One bool per target page: its slot holds the page (else it is zero).
    present: np.ndarray = attrs.field(eq=False, repr=False)

    @property
    def data_pages(self) -> int:
        return int(np.count_nonzero(self.present))


@attrs.define
class Snapshot:
    """An open snapshot file (close it, or use it as a context manager)."""

    path: str
    offset: int
    fd: int
    blocks: dict[str, SnapshotBlock]
    device_state: bytes
    file_size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_blocks(self, specs: Sequence[RamBlockSpec]) -> None:
        """The snapshot's blocks must be the guest's: same names and sizes."""
        ours = {spec.name: spec.size for spec in specs}
        theirs = {name: block.size for name, block in self.blocks.items()}
        if ours != theirs:
            raise ConfigError(
                f"{self.path} holds RAM blocks {_describe(theirs)}, but this guest has "
                f"{_describe(ours)} (give the same --ram and --huge as when it was saved)"
            )

    def read_pages(self, block: SnapshotBlock, first: int, rows: np.ndarray) -> None:
        """Read the slots of pages ``[first, first + len(rows))`` into ``rows`` and zero
        the rows whose bit is clear (a slot may hold a page that went zero later)."""
        want = rows.shape[0] * TARGET_PAGE_SIZE
        at = block.layout.pages_offset + first * TARGET_PAGE_SIZE
        got = read_at(self.fd, rows.data.cast("B"), at)
        if got != want:
            raise BadSnapshot(
                f"{self.path}: the page slots of RAM block {block.name!r} end early "
                f"(the file ends at offset {at + got})",
                at,
            )
        absent = ~block.present[first : first + rows.shape[0]]
        if absent.any():
            rows[absent] = 0


def _describe(blocks: dict[str, int]) -> str:
    return ", ".join(f"{name!r} ({size} bytes)" for name, size in blocks.items()) or "none"


def open_snapshot(path: str, offset: int = 0) -> Snapshot:
    """Open and check a mapped-ram snapshot written by trimig at ``offset`` of ``path``.

    Raises ConfigError (no such file, offset past its end), BadStreamFile (a malformed
    stream, naming the offset), NotMappedRam or BadSnapshot."""
    report = inspect_file(path, start=offset)
    if report.stopped is not None:
        raise BadSnapshot(f"{path}: {report.stopped.message}", report.stopped.offset)
    config = report.configuration
    machine = config.machine if config is not None else None
    if machine != TRIMIG_MACHINE:
        raise BadSnapshot(
            f"{path}: machine type {machine!r}: trimig restores only the guests it saved "
            "(`trimig inspect` reads QEMU's files)",
            config.offset if config is not None else offset,
        )
    missing = [name for name, block in report.blocks.items() if block.mapped_ram is None]
    if missing or not report.blocks:
        raise NotMappedRam(
            f"{path} is a migration stream without the mapped-ram layout (RAM block(s) "
            f"{', '.join(missing) or 'none'} have no fixed page slots)"
        )
    states = [
        record
        for section in report.sections.values()
        if section.idstr == GUEST_SECTION
        for record in section.records
        if record.data_offset is not None
    ]
    if len(states) != 1:
        raise BadSnapshot(f"{path}: {len(states)} device states of the guest (expected one)")
    state_record = states[0]
    assert state_record.data_offset is not None and state_record.data_size is not None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        device_state = bytearray(state_record.data_size)
        read_at(fd, memoryview(device_state), state_record.data_offset)
        blocks = {}
        for name, info in report.blocks.items():
            header = info.mapped_ram
            assert header is not None
            layout = BlockLayout(
                header.header_offset,
                header.bitmap_offset,
                header.bitmap_size,
                header.pages_offset,
                info.size,
            )
            raw = np.zeros(header.bitmap_size, dtype=np.uint8)
            read_at(fd, raw.data, header.bitmap_offset)
            present = np.unpackbits(raw, bitorder="little")[: info.page_count].astype(bool)
            blocks[name] = SnapshotBlock(name, info.size, layout, present)
    except BaseException:
        os.close(fd)
        raise
    return Snapshot(path, offset, fd, blocks, bytes(device_state), report.file_size)
