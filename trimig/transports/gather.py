"""Gather writes without a Python object per entry: IoVector and writev through cffi.

A window of 512 pages is 1024 gather entries (a record header, then the page). As Python
buffer objects that is 1024 slices to make, check and hand to ``sendmsg`` per window,
which costs more than the kernel's copy of the pages. An :class:`IoVector` is the same
gather list as one numpy array of ``struct iovec`` (address, length), built with array
operations; :func:`write_gather` sends any mix of IoVectors and ordinary buffers with
``writev(2)`` called through cffi (ABI mode), which releases the GIL.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import TypeAlias

import cffi
import numpy as np
import trio

from trimig.errors import KernelError, LocalProtocolError
from trimig.transports.base import IOV_MAX, Buffer

_ffi = cffi.FFI()
_ffi.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, long offset);
    """
)
_libc = _ffi.dlopen(None)


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
            memoryview(_ffi.buffer(_ffi.cast("char *", address), length)).cast("B")
            for address, length in self.entries.tolist()
            if length
        ]


GatherItem: TypeAlias = "Buffer | IoVector"


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
    """One iovec array for all of ``items`` and the cffi handles that pin plain buffers."""
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
        pin = _ffi.from_buffer(view)
        pins.append(pin)
        address = int(_ffi.cast("uintptr_t", pin))
        arrays.append(np.array([[address, view.nbytes]], dtype=np.uint64))
    if not arrays:
        return np.empty((0, 2), dtype=np.uint64), pins
    entries = np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()
    return entries[entries[:, 1] > 0], pins


async def write_gather(fd: int, items: Sequence[GatherItem]) -> int:
    """Write every byte of ``items`` to the non-blocking ``fd`` with writev; return the count.

    Waits for ``fd`` to become writable when the kernel buffer is full. Raises OSError
    (EPIPE, ECONNRESET, ...) as os.writev would. Cancelled while waiting, an unknown
    prefix has been written. Not a checkpoint by itself when nothing blocks.
    """
    entries, pins = _entries(items)
    total = int(entries[:, 1].sum())
    index = 0
    count = len(entries)
    iovecs = _ffi.cast("struct iovec *", entries.ctypes.data)
    while index < count:
        batch = min(count - index, IOV_MAX)
        written = _libc.writev(fd, iovecs + index, batch)
        if written < 0:
            code = _ffi.errno
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                await trio.lowlevel.wait_writable(fd)
                continue
            if code == errno.EINTR:
                continue
            raise OSError(code, os.strerror(code))
        # Skip the entries written whole; shorten the one written in part.
        lengths = entries[index : index + batch, 1]
        ends = np.cumsum(lengths)
        done = int(np.searchsorted(ends, written, side="right"))
        index += done
        if done < batch:
            already = int(ends[done - 1]) if done else 0
            part = written - already
            if part:
                entries[index, 0] += np.uint64(part)
                entries[index, 1] -= np.uint64(part)
    del pins
    return total


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
    iovecs = _ffi.cast("struct iovec *", entries.ctypes.data)
    index = 0
    while index < count:
        batch = min(count - index, IOV_MAX)
        written = _libc.pwritev(fd, iovecs + index, batch, offset)
        if written < 0:
            code = _ffi.errno
            if code == errno.EINTR:
                continue
            raise KernelError("pwritev", code, f"{batch * width} bytes at offset {offset:#x}")
        if written == 0:
            raise KernelError("pwritev", errno.EIO, f"no progress at offset {offset:#x}")
        offset += written
        done, part = divmod(written, width)
        index += done
        if part:  # a short write inside a row: finish that row on its own
            rest = rows[index, part:]
            write_rows_at(fd, offset, rest.reshape(1, -1))
            offset += width - part
            index += 1
