"""Reserve free 2 MiB huge pages for a while and give them back: shared by the suite's
``hugepages`` fixture and by ``campaign.py``, which runs outside pytest."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from trimig.kernel.memory import HUGE_PAGE_SIZE

HUGEPAGES_SYSFS = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE_SIZE // 1024}kB")


class HugePagesUnavailable(Exception):
    """The kernel has no 2 MiB pool, or would not give enough free pages; says which."""


def free_hugepages() -> int:
    """The number of free 2 MiB huge pages right now."""
    return int((HUGEPAGES_SYSFS / "free_hugepages").read_text())


@contextlib.contextmanager
def reserved_hugepages(needed: int) -> Iterator[int]:
    """At least ``needed`` free 2 MiB huge pages while the block runs.

    Raises the pool (nr_hugepages of the 2 MiB size) if too few are free and lowers it
    back to what it was on exit; yields the number free at the start. Raises
    HugePagesUnavailable with the kernel's reason if it refuses."""
    if not HUGEPAGES_SYSFS.exists():
        raise HugePagesUnavailable(f"the kernel has no 2 MiB hugetlb pool ({HUGEPAGES_SYSFS})")
    nr_path = HUGEPAGES_SYSFS / "nr_hugepages"
    original = int(nr_path.read_text())
    free = free_hugepages()
    raised = False
    if free < needed:
        try:
            nr_path.write_text(str(original + needed - free))
        except OSError as error:
            reason = f"the kernel refused to reserve huge pages: {error}"
            raise HugePagesUnavailable(reason) from error
        raised = True
        free = free_hugepages()
        if free < needed:
            nr_path.write_text(str(original))
            raise HugePagesUnavailable(
                f"the kernel gave only {free} free huge pages, {needed} are needed"
            )
    try:
        yield free
    finally:
        if raised:
            with contextlib.suppress(OSError):
                nr_path.write_text(str(original))
