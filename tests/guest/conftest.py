"""Fixtures for the guest tests: RAM blocks, guest processes.

(``hugepages`` is the suite's, in tests/conftest.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

from trimig.guest.host import GuestProcess
from trimig.ram_blocks import RamBlock, RamBlockSpec, create_blocks


@pytest.fixture
def make_blocks() -> Iterator[Callable[[Sequence[RamBlockSpec]], list[RamBlock]]]:
    """Factory: ``make_blocks(specs)`` creates engine-side RAM blocks, closed at teardown."""
    made: list[RamBlock] = []

    def make(specs: Sequence[RamBlockSpec]) -> list[RamBlock]:
        blocks = create_blocks(specs)
        made.extend(blocks)
        return blocks

    yield make
    for block in made:
        block.close()


@pytest.fixture
async def start_guest() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await start_guest(command=None, **options)``; every guest is closed at
    teardown."""
    guests: list[GuestProcess] = []

    async def start(command: Sequence[str] | None = None, **options: Any) -> GuestProcess:
        guest = await GuestProcess.start(command, **options)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        await guest.aclose()
