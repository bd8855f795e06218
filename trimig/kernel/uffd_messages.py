"""The messages read from a userfaultfd (struct uffd_msg): page faults and the
non-cooperative events, as values, and :func:`decode`, which turns one into its value."""

from __future__ import annotations

import errno as errno_codes
from typing import Any

import attrs

from ..errors import KernelError
from . import _ffi


@attrs.frozen
class PageFault:
    """One ``UFFD_EVENT_PAGEFAULT``: the faulting address (page aligned unless
    EXACT_ADDRESS), whether it was a write, a write-protect or a minor fault, and the
    faulting thread's id (0 unless the THREAD_ID feature is enabled)."""

    address: int
    write: bool
    wp: bool
    minor: bool
    thread_id: int


@attrs.frozen
class ForkEvent:
    """``UFFD_EVENT_FORK`` (feature EVENT_FORK): ``fd`` is a new userfaultfd, now open in
    this process, for the child's copy of the registered ranges. The receiver owns it."""

    fd: int


@attrs.frozen
class RemapEvent:
    """``UFFD_EVENT_REMAP`` (feature EVENT_REMAP): mremap moved a registered range."""

    source: int
    destination: int
    length: int


@attrs.frozen
class RemoveEvent:
    """``UFFD_EVENT_REMOVE`` (madvise DONTNEED/REMOVE) or, with ``unmapped``,
    ``UFFD_EVENT_UNMAP`` (munmap) of ``[start, end)`` of a registered range."""

    start: int
    end: int
    unmapped: bool


UffdEvent = PageFault | ForkEvent | RemapEvent | RemoveEvent


def decode(message: Any) -> UffdEvent:
    """The value of one ``struct uffd_msg``; KernelError for an event this module does not know."""
    event = message.event
    if event == _ffi.UFFD_EVENT_PAGEFAULT:
        pagefault = message.arg.pagefault
        flags = pagefault.flags
        return PageFault(
            address=int(pagefault.address),
            write=bool(flags & _ffi.UFFD_PAGEFAULT_FLAG_WRITE),
            wp=bool(flags & _ffi.UFFD_PAGEFAULT_FLAG_WP),
            minor=bool(flags & _ffi.UFFD_PAGEFAULT_FLAG_MINOR),
            thread_id=int(pagefault.feat.ptid),
        )
    if event == _ffi.UFFD_EVENT_FORK:
        return ForkEvent(int(message.arg.fork.ufd))
    if event == _ffi.UFFD_EVENT_REMAP:
        remap = message.arg.remap
        return RemapEvent(int(getattr(remap, "from")), int(remap.to), int(remap.len))
    if event in (_ffi.UFFD_EVENT_REMOVE, _ffi.UFFD_EVENT_UNMAP):
        remove = message.arg.remove
        return RemoveEvent(
            int(remove.start), int(remove.end), unmapped=event == _ffi.UFFD_EVENT_UNMAP
        )
    raise KernelError("read(userfaultfd)", errno_codes.EPROTO, f"unknown event {event:#x}")
