"""memfd_create, Mapping, madvise, punch_hole and buffer_address on the real kernel."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from trimig.errors import ConfigError, KernelError
from trimig.kernel import (
    HUGE_PAGE_SIZE,
    MADV_REMOVE,
    PAGE_SIZE,
    Mapping,
    buffer_address,
    memfd_create,
    punch_hole,
)
from trimig.kernel._ffi import ffi

P = PAGE_SIZE


def test_page_sizes() -> None:
    assert PAGE_SIZE == 4096
    assert HUGE_PAGE_SIZE == 2 * 1024 * 1024


def test_memfd_is_cloexec_and_sizable() -> None:
    fd = memfd_create("trimig-test")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:trimig-test")
        os.ftruncate(fd, 8 * P)
        assert os.fstat(fd).st_size == 8 * P
    finally:
        os.close(fd)


def test_mapping_is_shared_with_the_file(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    with Mapping(fd, 4 * P) as mapping:
        assert mapping.length == 4 * P
        assert mapping.address % P == 0
        assert mapping.buffer.format == "B" and not mapping.buffer.readonly
        assert buffer_address(mapping.buffer) == mapping.address
        mapping.buffer[P : P + 5] = b"hello"
        assert os.pread(fd, 5, P) == b"hello"
        os.pwrite(fd, b"world", 3 * P)
        assert bytes(mapping.buffer[3 * P : 3 * P + 5]) == b"world"
        # The address is the real one: native code sees the same bytes.
        assert ffi.buffer(ffi.cast("char *", mapping.address + P), 5)[:] == b"hello"
    assert mapping.closed


def test_mapping_at_an_offset(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    os.pwrite(fd, b"second", 2 * P)
    with Mapping(fd, 2 * P, offset=2 * P) as mapping:
        assert bytes(mapping.buffer[:6]) == b"second"


def test_mapping_populate_allocates_the_pages(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(16 * P)
    assert os.fstat(fd).st_blocks == 0
    with Mapping(fd, 16 * P, populate=True):
        assert os.fstat(fd).st_blocks * 512 == 16 * P


def test_close_refuses_while_views_are_alive(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(2 * P)
    mapping = Mapping(fd, 2 * P)
    array = np.frombuffer(mapping.buffer, dtype=np.uint8)
    with pytest.raises(BufferError):
        mapping.close()
    assert not mapping.closed
    array[0] = 7  # still mapped and usable
    assert mapping.buffer[0] == 7
    del array
    piece = mapping.buffer[P:]
    with pytest.raises(BufferError):
        mapping.close()
    assert mapping.buffer[0] == 7
    del piece
    mapping.close()
    assert mapping.closed
    mapping.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        mapping.buffer  # noqa: B018


def test_mapping_rejects_bad_arguments(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(2 * P)
    with pytest.raises(ConfigError, match="length"):
        Mapping(fd, 0)
    with pytest.raises(ConfigError, match="offset"):
        Mapping(fd, P, offset=100)
    read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(KernelError) as info:
            Mapping(read_only, P)  # a shared writable mapping of a read-only fd
    finally:
        os.close(read_only)
    assert info.value.errno == errno.EACCES
    assert "mmap" in str(info.value)


def test_punch_hole_frees_and_zeroes(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    os.pwrite(fd, b"\xaa" * (4 * P), 0)
    assert os.fstat(fd).st_blocks * 512 == 4 * P
    punch_hole(fd, P, 2 * P)
    assert os.fstat(fd).st_size == 4 * P
    assert os.fstat(fd).st_blocks * 512 == 2 * P
    assert os.pread(fd, 2 * P, P) == bytes(2 * P)
    assert os.pread(fd, P, 0) == b"\xaa" * P
    assert os.lseek(fd, 0, os.SEEK_HOLE) == P
    assert os.lseek(fd, P, os.SEEK_DATA) == 3 * P


def test_punch_hole_errors() -> None:
    with pytest.raises(ConfigError):
        punch_hole(0, 0, 0)
    with pytest.raises(KernelError) as info:
        punch_hole(-1, 0, P)
    assert info.value.errno == errno.EBADF


def test_madvise_remove_and_errors(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    with Mapping(fd, 4 * P) as mapping:
        mapping.buffer[:] = b"\x11" * (4 * P)
        mapping.madvise(MADV_REMOVE, P, P)
        assert os.pread(fd, P, P) == bytes(P)
        assert mapping.buffer[P] == 0 and mapping.buffer[0] == 0x11
        with pytest.raises(ConfigError, match="outside"):
            mapping.madvise(MADV_REMOVE, 3 * P, 2 * P)
        with pytest.raises(ConfigError, match="offset"):
            mapping.madvise(MADV_REMOVE, 1)
        with pytest.raises(KernelError) as info:
            mapping.madvise(12345)
        assert info.value.errno == errno.EINVAL


def test_buffer_address_of_read_only_buffers() -> None:
    data = b"read-only bytes"
    address = buffer_address(data)
    assert ffi.buffer(ffi.cast("char *", address), len(data))[:] == data
    array = np.arange(10, dtype=np.uint64)
    assert buffer_address(array) == array.ctypes.data


def test_hugetlb_memfd(hugepages: Any) -> None:
    free_before = hugepages.free()
    fd = memfd_create("trimig-huge", hugetlb=True)
    try:
        with pytest.raises(OSError):
            os.ftruncate(fd, P)  # not a multiple of the huge page size
        os.ftruncate(fd, 2 * HUGE_PAGE_SIZE)
        with Mapping(fd, 2 * HUGE_PAGE_SIZE) as mapping:
            assert mapping.address % HUGE_PAGE_SIZE == 0
            mapping.buffer[0] = 1
            mapping.buffer[HUGE_PAGE_SIZE + 5] = 2
            assert hugepages.free() == free_before - 2
            punch_hole(fd, HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)
            assert hugepages.free() == free_before - 1
            punch_hole(fd, P, P)  # inside one huge page: frees nothing
            assert hugepages.free() == free_before - 1
            assert mapping.buffer[0] == 1
            assert os.pread(fd, 16, HUGE_PAGE_SIZE) == bytes(16)
    finally:
        os.close(fd)
    assert hugepages.free() == free_before
