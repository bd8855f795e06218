"""Fixtures for the guest tests: RAM blocks, guest processes, huge pages."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from trimig.guest.host import GuestProcess
from trimig.kernel.memory import HUGE_PAGE_SIZE
from trimig.ram import RamBlock, RamBlockSpec, create_blocks

HUGEPAGES_SYSFS = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE_SIZE // 1024}kB")
HUGEPAGES_NEEDED = 4


@pytest.fixture(scope="session")
def hugepages() -> Iterator[int]:
    """Ensure HUGEPAGES_NEEDED free 2 MiB huge pages (raising the pool, lowered back after);
    skips with the reason only if the kernel refuses."""
    if not HUGEPAGES_SYSFS.exists():
        pytest.skip(f"the kernel has no 2 MiB hugetlb pool ({HUGEPAGES_SYSFS} is missing)")
    nr_path = HUGEPAGES_SYSFS / "nr_hugepages"
    original = int(nr_path.read_text())
    free = int((HUGEPAGES_SYSFS / "free_hugepages").read_text())
    raised = False
    if free < HUGEPAGES_NEEDED:
        try:
            nr_path.write_text(str(original + HUGEPAGES_NEEDED - free))
        except OSError as error:
            pytest.skip(f"the kernel refused to reserve huge pages: {error}")
        raised = True
        free = int((HUGEPAGES_SYSFS / "free_hugepages").read_text())
        if free < HUGEPAGES_NEEDED:
            nr_path.write_text(str(original))
            pytest.skip(f"only {free} free huge pages, {HUGEPAGES_NEEDED} are needed")
    yield HUGEPAGES_NEEDED
    if raised:
        with contextlib.suppress(OSError):
            nr_path.write_text(str(original))


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
