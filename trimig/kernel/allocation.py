"""Which huge pages of a hugetlbfs file are allocated, found without allocating any.

hugetlbfs has no SEEK_DATA/SEEK_HOLE and its mincore(2) reports only the pages a mapping
has page-table entries for, so neither tells a punched hole from an allocated page that
nobody mapped. UFFDIO_CONTINUE does: on a mapping registered in MINOR mode it maps a
page that is in the file's page cache and fails with EFAULT where the file has a hole,
allocating nothing. :class:`HugetlbAllocationMap` keeps such a mapping, which nothing
ever touches, and asks once per huge page.
"""

from __future__ import annotations

import numpy as np

from ._owned import ClosesOnExit
from .memory import Mapping
from .uffd import Feature, Mode, Userfaultfd


class HugetlbAllocationMap(ClosesOnExit):
    """The allocated huge pages of the hugetlbfs file ``fd`` (``size`` bytes, huge pages
    of ``page_size``). Raises MissingKernelFeature without MINOR_HUGETLBFS."""

    def __init__(self, fd: int, size: int, page_size: int) -> None:
        self.page_size = page_size
        self.pages = size // page_size
        self._uffd = Userfaultfd.create()
        try:
            self._uffd.api(
                Feature.MINOR_HUGETLBFS, needed_for="finding punched huge pages (dirty log)"
            )
            self._mapping = Mapping(fd, size)
        except BaseException:
            self._uffd.close()
            raise
        try:
            self._uffd.register(self._mapping.address, size, Mode.MINOR)
        except BaseException:
            self._mapping.close()
            self._uffd.close()
            raise

    def allocated(self) -> np.ndarray:
        """One bool per huge page: in the file now. A hole punched later (which unmaps the
        page from every mapping, this one too) reads as a hole at the next call."""
        base = self._mapping.address
        return np.fromiter(
            (
                self._uffd.page_in_file(base + i * self.page_size, self.page_size)
                for i in range(self.pages)
            ),
            dtype=bool,
            count=self.pages,
        )

    def close(self) -> None:
        """Unmap and close (the registration ends with the userfaultfd)."""
        if not self._mapping.closed:
            self._mapping.close()
        self._uffd.close()
