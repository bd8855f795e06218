"""RAM blocks: named, sized memfd regions, as the engine holds them.

The engine creates every block's memfd and maps it itself; the guest process
receives the fd over SCM_RIGHTS and maps it too. The source reads pages straight
from its mapping; the destination writes them straight into its mapping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from .errors import ConfigError
from .kernel.memory import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, memfd_create

TARGET_PAGE_SIZE = 4096


@attrs.frozen
class RamBlockSpec:
    """A block's identity: its name, its size in bytes and its host page size."""

    name: str
    size: int
    page_size: int = PAGE_SIZE

    def __attrs_post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 255:
            raise ConfigError(f"RAM block name {self.name!r} must be 1 to 255 bytes")
        if self.page_size not in (PAGE_SIZE, HUGE_PAGE_SIZE):
            raise ConfigError(
                f"RAM block {self.name!r}: page size {self.page_size} is neither 4 KiB nor 2 MiB"
            )
        if self.size <= 0 or self.size % self.page_size:
            raise ConfigError(
                f"RAM block {self.name!r}: size {self.size} is not a positive multiple of "
                f"its page size {self.page_size}"
            )

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


class RamBlock:
    """A block's memfd and the engine's shared mapping of it. Close it when done."""

    def __init__(self, spec: RamBlockSpec) -> None:
        self.spec = spec
        self.fd = memfd_create(f"trimig:{spec.name}", hugetlb=spec.hugetlb)
        try:
            os.ftruncate(self.fd, spec.size)
            self.mapping = Mapping(self.fd, spec.size)
        except BaseException:
            os.close(self.fd)
            raise
        #: The block as bytes, one row per target page: shape (pages, 4096), uint8.
        self.pages: np.ndarray = np.frombuffer(self.mapping.buffer, dtype=np.uint8).reshape(
            -1, TARGET_PAGE_SIZE
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """Yield the [start, end) byte ranges of the memfd that hold data (not holes).

        Holes read as zero; reading them through a mapping would allocate them,
        so scanners skip them with SEEK_DATA/SEEK_HOLE instead.
        """
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                return
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            yield start, end
            offset = end

    def close(self) -> None:
        """Unmap and close. Views of ``pages`` must be gone first."""
        if self.fd < 0:
            return
        del self.pages
        self.mapping.close()
        os.close(self.fd)
        self.fd = -1


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
