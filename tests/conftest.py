"""Suite-wide fixtures: the leak check around every test, and reserved huge pages.

* ``no_leaks`` (autouse): every test must end with no fd, child process or memfd mapping
  it did not start with (see ``leakcheck.py``). It is a sync fixture, so it brackets the
  whole trio run of an async test, fixtures included. A test whose *scaffolding* keeps
  something open past its end (never the code under test) is marked
  ``@pytest.mark.leaks_allowed("reason")``.
* ``hugepages`` (session): at least HUGEPAGES_NEEDED free 2 MiB huge pages, reserved by
  raising the pool if needed and given back at the end of the session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Helper modules of the suite (leakcheck.py, the harnesses) live next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hugepool import HugePagesUnavailable, free_hugepages, reserved_hugepages
from leakcheck import ResourceSnapshot, assert_no_leaks

#: How long the leak check waits for children being reaped and objects being collected.
LEAK_SETTLE_SECONDS = 3.0

#: Enough for the largest user: two 32 MiB hugetlb blocks (source and destination) at once.
HUGEPAGES_NEEDED = 40


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leaks_allowed(reason): skip the suite's leak check for this test; only for "
        "resources the test scaffolding keeps, with the reason",
    )


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test (at teardown) if it leaves an fd, a child or a memfd mapping behind."""
    marker = request.node.get_closest_marker("leaks_allowed")
    if marker is not None:
        if not marker.args or not str(marker.args[0]).strip():
            raise pytest.UsageError(f"{request.node.nodeid}: leaks_allowed needs a reason")
        yield
        return
    before = ResourceSnapshot.take()
    yield
    assert_no_leaks(before, settle=LEAK_SETTLE_SECONDS)


class HugePages:
    """What the ``hugepages`` fixture yields: ``count`` 2 MiB pages were free at the start;
    ``free()`` reads the number free now. Also usable as that int."""

    def __init__(self, count: int) -> None:
        self.count = count

    def free(self) -> int:
        """The number of free 2 MiB huge pages right now."""
        return free_hugepages()

    def __int__(self) -> int:
        return self.count

    __index__ = __int__


@pytest.fixture(scope="session")
def hugepages() -> Iterator[HugePages]:
    """Ensure at least HUGEPAGES_NEEDED free 2 MiB huge pages for the session.

    Raises the pool if needed and lowers it back afterwards (``hugepool.py``); skips
    with the kernel's reason only if it refuses."""
    try:
        with reserved_hugepages(HUGEPAGES_NEEDED):
            yield HugePages(HUGEPAGES_NEEDED)
    except HugePagesUnavailable as error:
        pytest.skip(str(error))
