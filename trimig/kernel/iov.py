"""Gather and scatter I/O: IOV_MAX, iovec arrays, writev and pwritev with partial writes, readv.

The only home of these system calls. Synchronous and trio-free: :class:`GatherWrite` writes
until everything is out or the fd would block and says which; the trio side (the
transports) and the thread side (``trimig.threads``) are thin drivers that wait for the fd
between its steps.

A window of 512 pages is 1024 gather entries (a record header, then the page). As Python
buffer objects that is 1024 slices to make, check and hand to ``sendmsg`` per window,
which costs more than the kernel's copy of the pages. An :class:`IoVector` is the same
gather list as one numpy array of ``struct iovec`` (address, length), built with array
operations; :class:`GatherWrite` writes any mix of IoVectors and ordinary buffers with
``writev(2)`` (or ``pwritev(2)`` into a file) called through cffi, which releases the GIL.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Final, TypeAlias

import numpy as np

from ..errors import KernelError, LocalProtocolError
from ._ffi import ffi, libc

IOV_MAX: Final[int] = os.sysconf("SC_IOV_MAX")
"""Most entries one readv/writev/sendmsg call takes (1024 on Linux)."""

# A contiguous buffer: bytes, bytearray, memoryview or anything exporting the buffer
# protocol (a numpy page array, an mmap). Python 3.11 has no collections.abc.Buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview


def byte_buffers(buffers: Sequence[Buffer]) -> tuple[list[Buffer], list[int]]:
    """Flat byte views of ``buffers`` (empty ones dropped) and their lengths. No copying."""
    views: list[Buffer] = []
    lengths: list[int] = []
    for buffer in buffers:
        kind = type(buffer)
        if kind is bytes or kind is bytearray:
            length = len(buffer)
        elif (
            kind is memoryview
            and buffer.ndim == 1  # type: ignore[union-attr]
            and buffer.itemsize == 1  # type: ignore[union-attr]
            and buffer.c_contiguous  # type: ignore[union-attr]
        ):
            length = buffer.nbytes  # type: ignore[union-attr]
        else:
            view = memoryview(buffer)
            if not view.c_contiguous:
                raise LocalProtocolError(
                    f"gather buffer {len(views)} is not contiguous ({view.strides} strides)"
                )
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            buffer, length = view, view.nbytes
        if length:
            views.append(buffer)
            lengths.append(length)
    return views, lengths


class IoVector:
    """A gather list as an ``(n, 2)`` uint64 array of (address, length) entries.

    ``owners`` are the objects whose memory the addresses point into (a numpy array of
    record headers, a block's page array): the vector keeps them alive, and so mapped,
    until it is dropped. The memory must not change until the vector has been sent.
    """

    __slots__ = ("entries", "nbytes", "owners")

    def __init__(self, entries: np.ndarray, owners: Sequence[object]) -> None:
        if entries.ndim != 2 or entries.shape[1] != 2 or entries.dtype != np.uint64:
            raise LocalProtocolError(
                f"an IoVector needs an (n, 2) uint64 array, got {entries.shape} {entries.dtype}"
            )
        self.entries = np.ascontiguousarray(entries)
        self.owners = tuple(owners)
        self.nbytes = int(self.entries[:, 1].sum())

    def __len__(self) -> int:
        return len(self.entries)

    def views(self) -> list[memoryview]:
        """The entries as memoryviews (for streams that cannot write raw addresses)."""
        return [
            memoryview(ffi.buffer(ffi.cast("char *", address), length)).cast("B")
            for address, length in self.entries.tolist()
            if length
        ]


GatherItem: TypeAlias = Buffer | IoVector


def flatten(items: Sequence[GatherItem]) -> list[Buffer]:
    """Ordinary buffers for ``items`` (IoVectors expanded into memoryviews)."""
    buffers: list[Buffer] = []
    for item in items:
        if isinstance(item, IoVector):
            buffers.extend(item.views())
        else:
            buffers.append(item)
    return buffers


def _entries(items: Sequence[GatherItem]) -> tuple[np.ndarray, list[object]]:
    """One iovec array for all of ``items`` (a copy: the caller's arrays are never changed)
    and the cffi handles that pin plain buffers."""
    arrays: list[np.ndarray] = []
    pins: list[object] = []
    for item in items:
        if isinstance(item, IoVector):
            arrays.append(item.entries)
            continue
        view = memoryview(item)
        if not view.c_contiguous:
            raise LocalProtocolError(f"gather buffer is not contiguous ({view.strides} strides)")
        if not view.nbytes:
            continue
        pin = ffi.from_buffer(view)
        pins.append(pin)
        address = int(ffi.cast("uintptr_t", pin))
        arrays.append(np.array([[address, view.nbytes]], dtype=np.uint64))
    if not arrays:
        return np.empty((0, 2), dtype=np.uint64), pins
    entries = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return entries[entries[:, 1] > 0], pins


class _Buffers:
    """Plain buffers, written with os.writev / os.pwritev (cheaper than iovecs for these)."""

    __slots__ = ("index", "lengths", "views")

    def __init__(self, buffers: Sequence[Buffer]) -> None:
        self.views, self.lengths = byte_buffers(buffers)
        self.index = 0

    def __len__(self) -> int:
        return len(self.views)

    def pending(self) -> list[Buffer]:
        return self.views[self.index : self.index + IOV_MAX]

    def call(self, fd: int, offset: int | None) -> int:
        batch = self.pending()
        return os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset)

    def advance(self, written: int) -> None:
        while written:
            length = self.lengths[self.index]
            if written >= length:
                written -= length
                self.index += 1
            else:
                self.views[self.index] = memoryview(self.views[self.index])[written:]
                self.lengths[self.index] = length - written
                written = 0


class _Iovecs:
    """An iovec array (IoVectors and the buffers among them), written through cffi."""

    __slots__ = ("entries", "index", "iovecs", "pins")

    def __init__(self, items: Sequence[GatherItem]) -> None:
        self.entries, self.pins = _entries(items)
        self.iovecs = ffi.cast("struct iovec *", self.entries.ctypes.data)
        self.index = 0

    def __len__(self) -> int:
        return len(self.entries)

    def pending(self) -> np.ndarray:
        return self.entries[self.index : self.index + IOV_MAX]

    def call(self, fd: int, offset: int | None) -> int:
        batch = min(len(self.entries) - self.index, IOV_MAX)
        if offset is None:
            written = libc.writev(fd, self.iovecs + self.index, batch)
        else:
            written = libc.pwritev(fd, self.iovecs + self.index, batch, offset)
        if written < 0:
            code = ffi.errno
            raise OSError(code, os.strerror(code))  # BlockingIOError, InterruptedError, ...
        return int(written)

    def advance(self, written: int) -> None:
        ends = np.cumsum(self.pending()[:, 1])
        done = int(np.searchsorted(ends, written, side="right"))
        self.index += done
        part = written - (int(ends[done - 1]) if done else 0)
        if part:  # the entry written in part
            self.entries[self.index, 0] += np.uint64(part)
            self.entries[self.index, 1] -= np.uint64(part)


class GatherWrite:
    """A gather write in progress: every byte of ``items``, and how many are out already.

    The one partial-write loop of trimig. :meth:`write` (a socket or a pipe) and
    :meth:`write_at` (a file) call writev/pwritev on up to IOV_MAX entries at a time; after
    a partial write the entries written whole are skipped and the one written in part is
    shortened, so no payload is copied or resent. Items must stay unchanged until done.
    Plain buffers go to os.writev as they are; with IoVectors among the items everything
    becomes one iovec array, written through cffi.
    """

    __slots__ = ("_batches", "remaining", "total")

    def __init__(self, items: Sequence[GatherItem]) -> None:
        self._batches: _Buffers | _Iovecs
        if any(isinstance(item, IoVector) for item in items):
            self._batches = _Iovecs(items)
            self.total = int(self._batches.entries[:, 1].sum())
        else:
            self._batches = _Buffers(items)  # type: ignore[arg-type]  # no IoVector among them
            self.total = sum(self._batches.lengths)
        #: Bytes not written yet.
        self.remaining = self.total

    @property
    def done(self) -> bool:
        return self._batches.index >= len(self._batches)

    def pending(self) -> list[Buffer] | np.ndarray:
        """What the next call writes: up to IOV_MAX buffers, or (address, length) rows of
        the iovec array when there are IoVectors; the first entry is shortened by a partial
        write. Not to be kept past :meth:`advance`."""
        return self._batches.pending()

    def advance(self, written: int) -> None:
        """Count the first ``written`` bytes of :meth:`pending` as written."""
        if not 0 < written <= self.remaining:
            raise LocalProtocolError(f"{written} bytes written of {self.remaining} pending")
        self._batches.advance(written)
        self.remaining -= written

    def write(self, fd: int) -> bool:
        """writev to ``fd`` until every byte is out (True) or the non-blocking ``fd`` is full
        (False: wait until it is writable and call again). Raises OSError (EPIPE,
        ECONNRESET, ...) as os.writev would."""
        return self._write(fd, None)

    def write_at(self, fd: int, offset: int) -> None:
        """pwritev every byte into the file ``fd``, starting at ``offset``. Raises OSError."""
        if not self._write(fd, offset):
            raise BlockingIOError(errno.EAGAIN, f"pwritev would block at offset {offset:#x}")

    def _write(self, fd: int, offset: int | None) -> bool:
        while not self.done:
            at = None if offset is None else offset + self.total - self.remaining
            try:
                written = self._batches.call(fd, at)
            except InterruptedError:
                continue
            except BlockingIOError:
                return False
            if written == 0:
                raise OSError(errno.EIO, f"no progress with {self.remaining} bytes to write")
            self.advance(written)
        return True


class GatherCopy:
    """The bytes of ``items`` copied, in order, into contiguous buffers: for a stream that
    must see its bytes whole (TLS encrypts one buffer at a time), without a Python object
    per entry. :meth:`copy_into` fills a buffer with the next bytes; one
    ``process_vm_readv(2)`` on this process per IOV_MAX entries does the gather (the
    kernel's copy; cffi releases the GIL). Items must stay unchanged until done.
    """

    __slots__ = ("_batches", "remaining")

    def __init__(self, items: Sequence[GatherItem]) -> None:
        self._batches = _Iovecs(items)
        #: Bytes not copied yet.
        self.remaining = int(self._batches.entries[:, 1].sum())

    def copy_into(self, buffer: memoryview) -> int:
        """Copy the next bytes into ``buffer`` (writable, contiguous) until it is full or
        nothing is left; the count. Raises KernelError."""
        view = memoryview(buffer).cast("B")
        pin = ffi.from_buffer(view, require_writable=True)
        local = ffi.new("struct iovec *")
        batches = self._batches
        filled = 0
        pid = os.getpid()
        while filled < view.nbytes and self.remaining:
            local.iov_base = pin + filled
            local.iov_len = view.nbytes - filled
            count = min(len(batches) - batches.index, IOV_MAX)
            copied = libc.process_vm_readv(pid, local, 1, batches.iovecs + batches.index, count, 0)
            if copied <= 0:  # 0: an entry's memory is not mapped
                raise KernelError("process_vm_readv (a gather copy)", ffi.errno or errno.EFAULT)
            batches.advance(int(copied))
            self.remaining -= int(copied)
            filled += int(copied)
        return filled


def write_rows_at(fd: int, offset: int, rows: np.ndarray) -> None:
    """Write the rows of a 2-D uint8 array (each row contiguous) back to back into the file
    ``fd`` at ``offset``, with pwritev: one call per IOV_MAX rows, no Python object per row.

    For a memfd this allocates the pages as it fills them, without the page faults and the
    zeroing that writing through a mapping costs. Raises KernelError.
    """
    if rows.ndim != 2 or rows.dtype != np.uint8 or (len(rows) > 1 and rows.strides[1] != 1):
        raise LocalProtocolError(f"write_rows_at needs uint8 rows, got {rows.shape} {rows.dtype}")
    count, width = rows.shape
    entries = np.empty((count, 2), dtype=np.uint64)
    entries[:, 0] = np.uint64(rows.ctypes.data) + np.arange(count, dtype=np.uint64) * np.uint64(
        rows.strides[0]
    )
    entries[:, 1] = width
    _write_all_at(fd, GatherWrite([IoVector(entries, (rows,))]), offset)


def readv(fd: int, buffers: Sequence[memoryview]) -> int | None:
    """One readv from the non-blocking ``fd`` into ``buffers``, in order: the byte count
    (0 at end of file), or None when nothing is there yet (wait until readable). Raises
    OSError. (A scatter read takes what is there: there is no partial read to finish.)"""
    try:
        return os.readv(fd, buffers)
    except BlockingIOError:
        return None


def read_at(fd: int, buffer: memoryview, offset: int) -> int:
    """pread from the file ``fd`` at ``offset`` until ``buffer`` is full or the file ends;
    return the bytes read (fewer than asked only at the end of the file). Raises KernelError.

    The read side of a file snapshot (a page read for a lazy restore's fault, a run of
    pages for an eager one, a header or bitmap), and how the source reads guest RAM:
    reading a memfd (shmem or hugetlbfs) this way never allocates a page (a hole reads as
    zeros and stays a hole, unlike a read through a mapping, whose page fault allocates
    it), and each page comes from one page-cache page, so a hole punched meanwhile cannot
    tear it (the read holds the page it copies from)."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < view.nbytes:
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except InterruptedError:
            continue
        except OSError as error:
            raise KernelError(
                "preadv",
                error.errno or errno.EIO,
                f"{view.nbytes - done} bytes at offset {offset + done:#x}",
            ) from None
        if count == 0:
            break
        done += count
    return done


def write_at(fd: int, data: Buffer, offset: int) -> None:
    """pwrite every byte of ``data`` into the file ``fd`` at ``offset``. Raises KernelError."""
    _write_all_at(fd, GatherWrite([data]), offset)


def _write_all_at(fd: int, gather: GatherWrite, offset: int) -> None:
    """``gather.write_at`` with its OSError as the KernelError naming what was left."""
    try:
        gather.write_at(fd, offset)
    except OSError as error:
        at = offset + gather.total - gather.remaining
        raise KernelError(
            "pwritev", error.errno or errno.EIO, f"{gather.remaining} bytes at offset {at:#x}"
        ) from None
