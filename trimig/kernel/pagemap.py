"""PAGEMAP_SCAN on ``/proc/PID/pagemap``: which pages of a WP_ASYNC range were written.

Dirty tracking works like this: the process owning the memory registers its ranges
with a userfaultfd in WP mode with the WP_ASYNC feature (WP_HUGETLBFS_SHMEM too for
shmem and hugetlb memory) and write-protects them (``Userfaultfd.writeprotect`` or
:meth:`PagemapScanner.protect`). A write then lifts the protection of its page
inside the kernel, without blocking the writer or queueing a message; a page is
"written" while it is not write-protected. :meth:`PagemapScanner.take_written`
reports those pages and write-protects them again, atomically per page table.
"""

from __future__ import annotations

import errno as errno_codes
import os

import numpy as np

from ..errors import ConfigError, KernelError, MissingKernelFeature
from . import _ffi
from ._ffi import errno, ffi, libc
from ._owned import OwnedFd
from .memory import PAGE_SIZE

#: page_region entries the kernel may fill per ioctl (the scan loops when it is full).
VECTOR_LENGTH = 4096

_EMPTY = np.empty((0, 2), dtype=np.uint64)
_EMPTY.flags.writeable = False
_EMPTY_ROWS = np.empty((0, 3), dtype=np.uint64)
_EMPTY_ROWS.flags.writeable = False


class PagemapScanner(OwnedFd):
    """Scans the written pages of process ``pid`` (``"self"`` works too) through
    ``/proc/PID/pagemap``. Not thread-safe: one scan at a time per scanner.
    Also a context manager."""

    def __init__(self, pid: int | str) -> None:
        path = f"/proc/{pid}/pagemap"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise KernelError("open", error.errno or 0, path) from None
        self.pid = pid
        # Reused output vector, one row per struct page_region: start, end, categories.
        self._vector = np.zeros((VECTOR_LENGTH, 3), dtype=np.uint64)
        self._arg = ffi.new(
            "struct pm_scan_arg *",
            {
                "size": ffi.sizeof("struct pm_scan_arg"),
                "vec": self._vector.ctypes.data,
                "vec_len": VECTOR_LENGTH,
                "category_mask": _ffi.PAGE_IS_WRITTEN,
                "return_mask": _ffi.PAGE_IS_WRITTEN,
            },
        )
        self._request = ffi.cast("unsigned long", _ffi.PAGEMAP_SCAN)

    def take_written(self, start: int, end: int) -> np.ndarray:
        """The written pages of ``[start, end)`` as an ``(n, 2)`` uint64 array of sorted,
        disjoint, non-adjacent ``[start, end)`` address ranges; they are write-protected
        again by the same scan, so the next call reports only pages written after it.

        Every page of the range must be registered with a WP_ASYNC userfaultfd
        (otherwise :class:`KernelError` EPERM)."""
        return self._scan(start, end, _ffi.PM_SCAN_WP_MATCHING | _ffi.PM_SCAN_CHECK_WPASYNC)

    def written(self, start: int, end: int) -> np.ndarray:
        """Like :meth:`take_written`, but leaves the pages as they are (read-only scan)."""
        return self._scan(start, end, _ffi.PM_SCAN_CHECK_WPASYNC)

    def present(self, start: int, end: int) -> np.ndarray:
        """The pages of ``[start, end)`` mapped present in the process's page tables, as
        :meth:`take_written` returns ranges (a read-only scan; no registration needed).
        For a shared file mapping a present page is in the file's page cache."""
        return self._scan(start, end, 0, category=_ffi.PAGE_IS_PRESENT)

    def written_and_present(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`written` and :meth:`present` of ``[start, end)`` from one walk of the page
        tables instead of two (a last sync: nothing is protected again). Each as
        :meth:`take_written` returns ranges."""
        both = _ffi.PAGE_IS_WRITTEN | _ffi.PAGE_IS_PRESENT
        rows = self._scan_rows(start, end, _ffi.PM_SCAN_CHECK_WPASYNC, category=0, anyof=both)
        written = rows[(rows[:, 2] & _ffi.PAGE_IS_WRITTEN) != 0, :2]
        present = rows[(rows[:, 2] & _ffi.PAGE_IS_PRESENT) != 0, :2]
        return (
            np.ascontiguousarray(merge_adjacent(written)),
            np.ascontiguousarray(merge_adjacent(present)),
        )

    def protect(self, start: int, end: int) -> None:
        """Write-protect every page of ``[start, end)`` (populated or not) without reporting
        anything: starts (or restarts) dirty tracking without the userfaultfd."""
        self._check(start, end)
        arg = ffi.new(
            "struct pm_scan_arg *",
            {
                "size": ffi.sizeof("struct pm_scan_arg"),
                "flags": _ffi.PM_SCAN_WP_MATCHING | _ffi.PM_SCAN_CHECK_WPASYNC,
                "start": start,
                "end": end,
            },
        )
        while True:
            if libc.ioctl(self._fd, self._request, arg) < 0:
                self._raise(errno(), start, end)
            if arg.walk_end >= end:
                return
            arg.start = arg.walk_end

    def _scan(
        self, start: int, end: int, flags: int, *, category: int = _ffi.PAGE_IS_WRITTEN
    ) -> np.ndarray:
        rows = self._scan_rows(start, end, flags, category=category)
        return np.ascontiguousarray(merge_adjacent(rows[:, :2]))

    def _scan_rows(
        self, start: int, end: int, flags: int, *, category: int, anyof: int = 0
    ) -> np.ndarray:
        """The kernel's page_region rows (start, end, categories) of the pages having every
        bit of ``category`` and, if ``anyof``, one of its bits; both are returned."""
        self._check(start, end)
        arg = self._arg
        arg.flags = flags
        arg.category_mask = category
        arg.category_anyof_mask = anyof
        arg.return_mask = category | anyof
        arg.start = start
        arg.end = end
        vector = self._vector
        chunks: list[np.ndarray] = []
        while True:
            count = libc.ioctl(self._fd, self._request, arg)
            if count < 0:
                self._raise(errno(), start, end)
            if count:
                chunks.append(vector[:count].copy())
            # The kernel stops early only when the output vector is full. Otherwise the
            # walk is complete, whatever walk_end says: Linux 6.18 leaves walk_end at the
            # point of an internal restart (its bounce buffer filled) even when the walk
            # then went on to the end.
            if count < VECTOR_LENGTH:
                break
            # Nothing before the last reported end is left to report.
            resume = max(int(arg.walk_end), int(vector[count - 1, 1]))
            if resume >= end:
                break
            arg.start = resume
        if not chunks:
            return _EMPTY_ROWS
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _check(self, start: int, end: int) -> None:
        if self._fd < 0:
            raise ValueError("the pagemap scanner is closed")
        if start < 0 or end <= start or start % PAGE_SIZE or end % PAGE_SIZE:
            raise ConfigError(
                f"PAGEMAP_SCAN: [{start:#x}, {end:#x}) is not a non-empty, page-aligned range"
            )

    def _raise(self, error: int, start: int, end: int) -> None:
        if error == errno_codes.ENOTTY:
            raise MissingKernelFeature("PAGEMAP_SCAN", "dirty page tracking")
        detail = f"pid {self.pid}, range [{start:#x}, {end:#x})"
        if error == errno_codes.EPERM:
            detail += ": part of it is not registered with a WP_ASYNC userfaultfd"
        raise KernelError("PAGEMAP_SCAN", error, detail)

    def __repr__(self) -> str:
        return f"<PagemapScanner pid={self.pid} fd={self._fd}>"


def merge_adjacent(ranges: np.ndarray) -> np.ndarray:
    """Merge rows whose start equals the previous row's end (rows sorted, disjoint)."""
    if len(ranges) < 2:
        return ranges if len(ranges) else _EMPTY
    breaks = ranges[1:, 0] != ranges[:-1, 1]
    if breaks.all():
        return ranges
    first = np.concatenate(([True], breaks))
    last = np.concatenate((breaks, [True]))
    return np.stack((ranges[first, 0], ranges[last, 1]), axis=1)
