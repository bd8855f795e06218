"""What the postcopy pieces need to know about a RAM block.

``BlockLayout`` is structural: ``trimig.ram.RamBlockSpec`` and ``RamBlock`` both
satisfy it. ``GuestRamBlock`` adds what placement and fault handling need: where
the *guest* mapped the block and the engine's memfd of it (for hole punching).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from ..errors import ConfigError

TARGET_PAGE_SIZE = 4096
"""Every page record on the wire addresses one 4 KiB target page."""


class BlockLayout(Protocol):
    """A RAM block's name, size in bytes and host page size (4 KiB or 2 MiB)."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def page_size(self) -> int: ...


def check_layout(block: BlockLayout) -> None:
    """Raise ConfigError unless the block's sizes suit target-page bookkeeping."""
    page_size = block.page_size
    if page_size < TARGET_PAGE_SIZE or page_size % TARGET_PAGE_SIZE:
        raise ConfigError(
            f"RAM block {block.name!r}: page size {page_size} is not a multiple of the "
            f"{TARGET_PAGE_SIZE}-byte target page"
        )
    if block.size <= 0 or block.size % page_size:
        raise ConfigError(
            f"RAM block {block.name!r}: size {block.size} is not a positive multiple of "
            f"its page size {page_size}"
        )


@attrs.frozen
class PageRequest:
    """A page request: ``[start, start+length)`` of ``block`` in bytes, host-page aligned."""

    block: str
    start: int
    length: int


@attrs.frozen
class GuestRamBlock:
    """A block as the destination's postcopy sees it.

    ``address`` is the start of the block in the *guest's* address space (the
    range the guest registered with its userfaultfd); ``memfd`` is the engine's
    fd of the block's memory, used to punch holes for discards.
    """

    name: str
    address: int
    size: int
    page_size: int
    memfd: int

    def __attrs_post_init__(self) -> None:
        check_layout(self)
        if self.address % self.page_size:
            raise ConfigError(
                f"RAM block {self.name!r}: guest address {self.address:#x} is not aligned "
                f"to its page size {self.page_size}"
            )

    @property
    def end(self) -> int:
        """First guest address past the block."""
        return self.address + self.size

    @property
    def target_pages_per_host_page(self) -> int:
        return self.page_size // TARGET_PAGE_SIZE
