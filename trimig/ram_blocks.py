"""RAM blocks: named, sized memfd regions. The one family of block types:

* :class:`BlockLayout`, what every block has (name, size, host page size), checked by
  :func:`check_layout`, the one validation of a block's shape;
* :class:`RamBlockSpec`, a layout as a value (the configuration, the guest protocol's
  ``attach``);
* :class:`MappedBlock`, a spec with a memfd and this process's shared mapping of it: the
  engine's :class:`RamBlock` (which creates the memfd) and the guest library's
  ``GuestBlock`` (which receives it).

The engine creates every block's memfd and maps it itself; the guest process
receives the fd over SCM_RIGHTS and maps it too. The source reads pages straight
from its mapping; the destination writes them straight into its mapping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

from .codec.constants import TARGET_PAGE_SIZE
from .errors import ConfigError
from .kernel.memory import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, memfd_create

MAX_NAME_BYTES = 255
"""Longest block name, in bytes of UTF-8 (it travels as a counted string)."""


class BlockLayout(Protocol):
    """A RAM block's name, size in bytes and host page size (4 KiB or 2 MiB)."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def page_size(self) -> int: ...


def check_layout(block: BlockLayout) -> None:
    """Raise ConfigError unless ``block`` has a name of 1 to 255 bytes, a page size of 4 KiB
    or 2 MiB (a multiple of the target page) and a size that is a positive multiple of it."""
    name, size, page_size = block.name, block.size, block.page_size
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"RAM block name {name!r} must be 1 to {MAX_NAME_BYTES} bytes")
    if page_size not in (PAGE_SIZE, HUGE_PAGE_SIZE) or page_size % TARGET_PAGE_SIZE:
        raise ConfigError(f"RAM block {name!r}: page size {page_size} is neither 4 KiB nor 2 MiB")
    if size <= 0 or size % page_size:
        raise ConfigError(
            f"RAM block {name!r}: size {size} is not a positive multiple of "
            f"its page size {page_size}"
        )


@attrs.frozen
class RamBlockSpec:
    """A block's identity: its name, its size in bytes and its host page size."""

    name: str
    size: int
    page_size: int = PAGE_SIZE

    def __attrs_post_init__(self) -> None:
        check_layout(self)

    @property
    def hugetlb(self) -> bool:
        return self.page_size != PAGE_SIZE

    @property
    def target_pages(self) -> int:
        return self.size // TARGET_PAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "page_size": self.page_size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RamBlockSpec:
        return cls(str(data["name"]), int(data["size"]), int(data.get("page_size", PAGE_SIZE)))


class MappedBlock:
    """A block's memfd (``fd``) and this process's shared mapping of it (``mapping``).

    Maps ``fd`` (at least ``spec.size`` bytes) and, once constructed, owns it; if mapping
    fails the fd stays the caller's. Close the block when done.
    """

    def __init__(self, spec: RamBlockSpec, fd: int) -> None:
        self.spec = spec
        self.mapping = Mapping(fd, spec.size)
        self.fd = fd

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    @property
    def address(self) -> int:
        """Virtual address of the mapping in this process."""
        return self.mapping.address

    @property
    def buffer(self) -> memoryview:
        """The block's memory, writable, format ``"B"``."""
        return self.mapping.buffer

    def close(self) -> None:
        """Unmap and close the memfd; closing again does nothing. Views of the memory must
        be gone first (else BufferError, and the block stays open)."""
        if self.fd < 0:
            return
        self.mapping.close()
        os.close(self.fd)
        self.fd = -1


class RamBlock(MappedBlock):
    """The engine's block: a fresh memfd of ``spec.size`` bytes and its mapping."""

    def __init__(self, spec: RamBlockSpec) -> None:
        fd = memfd_create(f"trimig:{spec.name}", hugetlb=spec.hugetlb)
        try:
            os.ftruncate(fd, spec.size)
            super().__init__(spec, fd)
        except BaseException:
            os.close(fd)
            raise
        #: The block as bytes, one row per target page: shape (pages, 4096), uint8.
        self.pages: np.ndarray = np.frombuffer(self.mapping.buffer, dtype=np.uint8).reshape(
            -1, TARGET_PAGE_SIZE
        )

    def data_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield the [start, end) byte ranges of the memfd that hold data (not holes), within
        ``[start, end)`` (default: all of it).

        Holes read as zero; reading them through a mapping would allocate them,
        so scanners skip them with SEEK_DATA/SEEK_HOLE instead.
        """
        limit = self.size if end is None else min(end, self.size)
        offset = start
        while offset < limit:
            try:
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                return
            if data >= limit:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), limit)
            yield data, hole
            offset = hole

    def close(self) -> None:
        """Unmap and close. Views of ``pages`` must be gone first."""
        if self.fd >= 0:
            del self.pages
        super().close()


def create_blocks(specs: Sequence[RamBlockSpec]) -> list[RamBlock]:
    """Create one RamBlock per spec; on failure close the ones already made."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"RAM block names must be unique, got {names}")
    blocks: list[RamBlock] = []
    try:
        for spec in specs:
            blocks.append(RamBlock(spec))
    except BaseException:
        for block in blocks:
            block.close()
        raise
    return blocks


def default_block_specs(ram: int, *, huge: int = 0) -> list[RamBlockSpec]:
    """The built-in guest's layout: ``pc.ram`` of ``ram`` bytes, plus ``pc.huge`` (2 MiB pages)."""
    specs = [RamBlockSpec("pc.ram", ram)]
    if huge:
        specs.append(RamBlockSpec("pc.huge", huge, HUGE_PAGE_SIZE))
    return specs
