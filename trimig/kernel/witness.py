"""Which pages of a memfd were discarded, whatever happened to them afterwards.

A guest discards a page with ``fallocate(PUNCH_HOLE)`` (or ``madvise(MADV_REMOVE)``):
the kernel unmaps the page from *every* mapping of the file, then frees it. Neither the
dirty log nor the file itself can be asked about it later: a read fault by the guest
puts a fresh zero page into the file (no hole left) and keeps the page write-protected
(the punch left a uffd-wp marker: no write logged), and the kernel may even hand the
freed page frame straight back. A mapping that nobody touches keeps the evidence: its
page-table entry for the page is gone and stays gone.

:class:`DiscardWitness` is such a mapping. It is registered with its own userfaultfd in
MINOR mode, so :meth:`~DiscardWitness.watch` can map pages the file holds with
UFFDIO_CONTINUE, which never allocates (a hole is skipped), and nothing ever faults on it;
:meth:`~DiscardWitness.watched` reads which entries are still there with PAGEMAP_SCAN.
A page watched and no longer mapped was discarded (or, harmlessly, reclaimed or
migrated: the caller then sends it once more).
"""

from __future__ import annotations

import numpy as np

from ._owned import ClosesOnExit
from .memory import Mapping
from .pagemap import PagemapScanner
from .uffd import Feature, Mode, Userfaultfd


class DiscardWitness(ClosesOnExit):
    """A witness mapping of the memfd ``fd`` (``size`` bytes, pages of ``page_size``:
    a huge page size for hugetlbfs). Raises MissingKernelFeature without the kernel's
    MINOR_SHMEM / MINOR_HUGETLBFS. Not thread-safe."""

    def __init__(self, fd: int, size: int, page_size: int, *, hugetlb: bool) -> None:
        self.page_size = page_size
        self.size = size
        feature = Feature.MINOR_HUGETLBFS if hugetlb else Feature.MINOR_SHMEM
        self._uffd = Userfaultfd.create()
        self._mapping: Mapping | None = None
        self._scanner: PagemapScanner | None = None
        try:
            self._uffd.api(feature, needed_for="finding discarded guest pages (dirty log)")
            self._mapping = Mapping(fd, size)
            self._uffd.register(self._mapping.address, size, Mode.MINOR)
            self._scanner = PagemapScanner("self")
        except BaseException:
            self.close()
            raise

    def watch(self, offset: int, length: int) -> None:
        """Map the pages of ``[offset, offset + length)`` (page aligned) that the file
        holds now; holes and pages already watched are skipped. A page watched is
        reported by :meth:`watched` until it is discarded."""
        assert self._mapping is not None
        self._uffd.map_from_file(self._mapping.address + offset, length, page_size=self.page_size)

    def watched(self) -> np.ndarray:
        """The byte ranges ``(n, 2)`` [start, end) of the file that are still mapped here:
        watched and not discarded since."""
        assert self._mapping is not None and self._scanner is not None
        base = self._mapping.address
        ranges = self._scanner.present(base, base + self.size)
        return ranges.astype(np.int64) - base

    def close(self) -> None:
        """Unmap and close (the registration ends with the userfaultfd); idempotent."""
        if self._scanner is not None:
            self._scanner.close()
        if self._mapping is not None and not self._mapping.closed:
            self._mapping.close()
        self._uffd.close()
