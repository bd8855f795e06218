"""memfds, shared mappings of them, madvise and hole punching.

Every failing system call raises :class:`~trimig.errors.KernelError`; bad arguments
raise :class:`~trimig.errors.ConfigError` naming what was wrong.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from ..errors import ConfigError, KernelError
from ._ffi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, errno, ffi, libc
from ._owned import ClosesOnExit

PAGE_SIZE: int = mmap.PAGESIZE
HUGE_PAGE_SIZE: int = 2 * 1024 * 1024

# madvise(2) advice values (asm-generic/mman-common.h)
MADV_NORMAL = 0
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

_MFD_CLOEXEC = 0x0001
_MFD_HUGETLB = 0x0004
_MFD_HUGE_2MB = 21 << 26


def memfd_create(name: str, *, hugetlb: bool = False) -> int:
    """Create an anonymous memory file (``MFD_CLOEXEC``) and return its fd; the caller owns it.

    With ``hugetlb`` the file is backed by 2 MiB huge pages (``MFD_HUGETLB|MFD_HUGE_2MB``):
    its size must then be a multiple of :data:`HUGE_PAGE_SIZE`, and mapping it needs free
    huge pages (``/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages``).
    """
    flags = _MFD_CLOEXEC
    if hugetlb:
        flags |= _MFD_HUGETLB | _MFD_HUGE_2MB
    try:
        return os.memfd_create(name, flags)
    except OSError as error:
        raise KernelError(
            "memfd_create", error.errno or 0, f"name {name!r}, hugetlb={hugetlb}"
        ) from None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset + length)`` of a memfd (the file keeps its size; holes read as 0).

    For a hugetlb memfd only the whole huge pages inside the range are freed.
    """
    if offset < 0 or length <= 0:
        raise ConfigError(f"punch_hole: bad range offset={offset} length={length}")
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise KernelError(
            "fallocate(PUNCH_HOLE)", errno(), f"fd {fd}, offset {offset:#x}, length {length:#x}"
        )


def buffer_address(buf: Any) -> int:
    """The address of the first byte of a contiguous buffer (writable or read-only).

    The address is valid only while ``buf`` stays alive and is not resized.
    """
    with ffi.from_buffer(buf) as cdata:
        return int(ffi.cast("uintptr_t", cdata))


class Mapping(ClosesOnExit):
    """A shared read-write mapping (``MAP_SHARED``) of ``length`` bytes of ``fd`` at ``offset``.

    A thin wrapper over :class:`mmap.mmap`. ``close()`` unmaps; it raises ``BufferError``
    (mmap's own export check) while any buffer exported from :attr:`buffer` is still
    alive (a numpy array over it, a ``memoryview`` slice of it, ...), so memory can
    never be unmapped under a live view; drop those first. The mapping then stays open
    and usable. Also a context manager.
    """

    address: int
    length: int

    def __init__(self, fd: int, length: int, *, offset: int = 0, populate: bool = False) -> None:
        if length <= 0:
            raise ConfigError(f"Mapping: length must be positive, got {length}")
        if offset < 0 or offset % PAGE_SIZE:
            raise ConfigError(
                f"Mapping: offset {offset} is not a non-negative multiple of "
                f"the page size {PAGE_SIZE}"
            )
        flags = mmap.MAP_SHARED
        if populate:
            flags |= mmap.MAP_POPULATE
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as error:
            raise KernelError(
                "mmap", error.errno or 0, f"fd {fd}, length {length:#x}, offset {offset:#x}"
            ) from None
        self.length = length
        self.address = buffer_address(self._mmap)
        self._view: memoryview | None = memoryview(self._mmap)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    @property
    def buffer(self) -> memoryview:
        """The whole mapping as a writable, format ``"B"`` memoryview."""
        if self._view is None:
            raise ValueError("the mapping is closed")
        return self._view

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) ``[offset, offset + length)`` of the mapping (default: to its end).

        ``offset`` must be page aligned. Use the ``MADV_*`` constants of this module.
        """
        if self._mmap is None:
            raise ValueError("the mapping is closed")
        if length is None:
            length = self.length - offset
        if offset < 0 or offset % PAGE_SIZE:
            raise ConfigError(
                f"madvise: offset {offset} is not a non-negative multiple of "
                f"the page size {PAGE_SIZE}"
            )
        if length <= 0 or offset + length > self.length:
            raise ConfigError(
                f"madvise: range offset={offset} length={length} is outside the mapping "
                f"of {self.length} bytes"
            )
        if libc.madvise(ffi.cast("void *", self.address + offset), length, advice) != 0:
            raise KernelError(
                "madvise", errno(), f"advice {advice}, offset {offset:#x}, length {length:#x}"
            )

    def resident(self) -> bytearray:
        """mincore(2) of the whole mapping: one byte per PAGE_SIZE page, bit 0 set where
        the page is in memory. For a shmem file that means in its page cache (whether or
        not this mapping touched it); for hugetlb, mapped by this mapping (a hole punched
        in the file unmaps it from every mapping)."""
        if self._mmap is None:
            raise ValueError("the mapping is closed")
        vec = bytearray(-(-self.length // PAGE_SIZE))
        out = ffi.from_buffer("unsigned char[]", vec)
        if libc.mincore(ffi.cast("void *", self.address), self.length, out) != 0:
            raise KernelError("mincore", errno(), f"length {self.length:#x}")
        return vec

    def close(self) -> None:
        """Unmap. Raises ``BufferError`` (and stays open) while exported buffers are alive."""
        if self._mmap is None:
            return
        if self._view is not None:
            self._view.release()  # BufferError if something holds a buffer of the view itself
            self._view = None
        try:
            self._mmap.close()
        except BufferError:
            self._view = memoryview(self._mmap)
            raise
        self._mmap = None

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else f"at {self.address:#x}"
        return f"<Mapping {self.length:#x} bytes {state}>"
