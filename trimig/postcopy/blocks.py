"""What the postcopy pieces need to know about a RAM block.

The postcopy pieces take any ``BlockLayout`` (``trimig.ram_blocks``: ``RamBlockSpec`` and
``RamBlock`` satisfy it) and check it with ``check_layout``, the validation every block
type shares; both are re-exported here. ``GuestRamBlock`` adds what placement and fault
handling need: where the *guest* mapped the block and the engine's memfd of it (for hole
punching).
"""

from __future__ import annotations

import attrs

from ..codec.constants import TARGET_PAGE_SIZE as TARGET_PAGE_SIZE
from ..errors import ConfigError
from ..ram_blocks import BlockLayout as BlockLayout
from ..ram_blocks import check_layout


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
