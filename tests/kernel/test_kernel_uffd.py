"""Userfaultfd on the real kernel: handshake errors, registration, MISSING-mode fault
resolution in-process (a native access that releases the GIL) and across processes
(a child creates the uffd and sends it to us over SCM_RIGHTS)."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import threading
from collections.abc import Callable
from typing import Any

import pytest

from trimig.errors import ConfigError, KernelError, MissingKernelFeature
from trimig.kernel import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    Feature,
    Ioctl,
    Mapping,
    Mode,
    PageFault,
    Userfaultfd,
    _ffi,
    buffer_address,
    query_api,
)
from trimig.kernel._ffi import ffi, libc

P = PAGE_SIZE


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    # Values of include/uapi/linux/userfaultfd.h and linux/fs.h on x86_64 / arm64.
    assert _ffi.UFFDIO_API == 0xC018AA3F
    assert _ffi.UFFDIO_REGISTER == 0xC020AA00
    assert _ffi.UFFDIO_UNREGISTER == 0x8010AA01
    assert _ffi.UFFDIO_WAKE == 0x8010AA02
    assert _ffi.UFFDIO_COPY == 0xC028AA03
    assert _ffi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert _ffi.UFFDIO_MOVE == 0xC028AA05
    assert _ffi.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert _ffi.UFFDIO_CONTINUE == 0xC020AA07
    assert _ffi.USERFAULTFD_IOC_NEW == 0xAA00
    assert _ffi.PAGEMAP_SCAN == 0xC0606610
    assert ffi.sizeof("struct uffd_msg") == 32
    assert ffi.offsetof("struct uffd_msg", "arg") == 8


def test_query_api_reports_the_kernel_offer() -> None:
    features, ioctls = query_api()
    # Linux 6.18 offers every feature up to MOVE on this machine.
    assert features == Feature((1 << 17) - 1)
    assert ioctls == Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API


def test_api_enables_requested_features() -> None:
    with Userfaultfd.create() as uffd:
        assert uffd.fileno() >= 0
        enabled = uffd.api(Feature.WP_ASYNC | Feature.THREAD_ID)
        assert enabled == Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.THREAD_ID
        assert uffd.features == enabled
        assert "userfaultfd" in os.readlink(f"/proc/self/fd/{uffd.fileno()}")
    assert uffd.closed
    with pytest.raises(ValueError, match="closed"):
        uffd.fileno()


def test_api_twice_is_an_error() -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(Feature(0))
        with pytest.raises(KernelError, match="already done") as info:
            uffd.api(Feature(0))
        assert info.value.errno == errno.EINVAL


def test_api_names_a_missing_feature() -> None:
    unknown = Feature(1 << 40)  # a bit no kernel offers (yet)
    with Userfaultfd.create() as uffd:
        with pytest.raises(MissingKernelFeature) as info:
            uffd.api(Feature.WP_ASYNC | unknown, needed_for="the test")
        assert info.value.feature == "UFFD_FEATURE(0x10000000000)"
        assert "needed for the test" in str(info.value)
        # The failed handshake left the fd usable: UFFDIO_API may be retried.
        assert uffd.api(Feature.WP_ASYNC) & Feature.WP_ASYNC


def test_blocking_uffd_flags() -> None:
    with Userfaultfd.create(nonblocking=False) as uffd:
        import fcntl

        assert not fcntl.fcntl(uffd.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(uffd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        uffd.api(Feature(0))
        assert uffd.read_faults() == []  # polls instead of blocking


def test_from_fd_rejects_other_files() -> None:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ConfigError, match="not a userfaultfd"):
            Userfaultfd.from_fd(fd)
    finally:
        os.close(fd)
    with pytest.raises(ConfigError):
        Userfaultfd.from_fd(-1)


def test_register_errors(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(4 * P)
    with Userfaultfd.create() as uffd, Mapping(fd, 4 * P) as mapping:
        with pytest.raises(KernelError) as info:  # before the API handshake
            uffd.register(mapping.address, 4 * P, Mode.MISSING)
        assert info.value.errno == errno.EINVAL
        uffd.api(Feature(0))
        with pytest.raises(ConfigError, match="pages"):
            uffd.register(mapping.address + 1, P, Mode.MISSING)
        with pytest.raises(ConfigError, match="mode"):
            uffd.register(mapping.address, P, Mode(0))
        with Mapping(memfd_factory(4 * P), 4 * P) as unmapped_soon:
            hole = unmapped_soon.address  # nothing is mapped there once it is closed
        with pytest.raises(KernelError, match="UFFDIO_REGISTER") as info:
            uffd.register(hole, 4 * P, Mode.MISSING)
        assert info.value.errno in (errno.ENOMEM, errno.EINVAL)
        ioctls = uffd.register(mapping.address, 4 * P, Mode.MISSING)
        assert ioctls & Ioctl.COPY and ioctls & Ioctl.ZEROPAGE and ioctls & Ioctl.WAKE
        assert not ioctls & Ioctl.WRITEPROTECT and not ioctls & Ioctl.CONTINUE
        uffd.unregister(mapping.address, 4 * P)


def _wait_readable(uffd: Userfaultfd, timeout: float = 10.0) -> None:
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    assert poller.poll(timeout * 1000), "no fault arrived in time"


def test_missing_fault_from_native_thread(memfd_factory: Callable[..., int]) -> None:
    """A cffi memset (GIL released) faults in another thread; we resolve it here."""
    fd = memfd_factory(4 * P)
    source = bytes(range(256)) * (P // 256)
    with Userfaultfd.create() as uffd, Mapping(fd, 4 * P) as mapping:
        uffd.api(Feature.MISSING_SHMEM | Feature.THREAD_ID)
        uffd.register(mapping.address, 4 * P, Mode.MISSING)
        assert uffd.read_faults() == []
        native_ids: list[int] = []

        def touch() -> None:
            native_ids.append(threading.get_native_id())
            libc.memset(ffi.cast("void *", mapping.address + 2 * P + 100), 0x5A, 50)

        thread = threading.Thread(target=touch)
        thread.start()
        try:
            _wait_readable(uffd)
            faults = uffd.read_faults()
            assert faults == [
                PageFault(
                    address=mapping.address + 2 * P,
                    write=True,
                    wp=False,
                    minor=False,
                    thread_id=native_ids[0],
                )
            ]
            assert uffd.copy(mapping.address + 2 * P, buffer_address(source), P) == P
            thread.join(10)
            assert not thread.is_alive()
        finally:
            uffd.close()  # never leave the thread blocked
            thread.join()
        page = bytes(mapping.buffer[2 * P : 3 * P])
        assert page[:100] == source[:100]
        assert page[100:150] == b"\x5a" * 50
        assert page[150:] == source[150:]


def test_missing_faults_across_processes(
    memfd_factory: Callable[..., int], spawn_child: Callable[..., Any]
) -> None:
    """The child registers its mapping; we place pages into it through its uffd."""
    size = 8 * P
    fd = memfd_factory(size)
    child = spawn_child(fd, size, "missing")
    uffd: Userfaultfd = child.uffd
    base = child.address
    source = os.urandom(4 * P)
    source_address = buffer_address(source)
    faults: list[PageFault] = []

    def resolve(fault: PageFault) -> None:
        faults.append(fault)
        page = fault.address - base
        if page == 0:
            assert uffd.copy(fault.address, source_address, P) == P
        else:
            assert uffd.zeropage(fault.address, P) == P

    reply = child.request({"op": "read", "offsets": [7, P + 9]}, resolve)
    assert reply == {"values": [source[7], 0]}
    assert faults == [
        PageFault(address=base, write=False, wp=False, minor=False, thread_id=child.pid),
        PageFault(address=base + P, write=False, wp=False, minor=False, thread_id=child.pid),
    ]

    # A write fault, resolved with the second source page.
    faults.clear()

    def resolve_write(fault: PageFault) -> None:
        faults.append(fault)
        uffd.copy(fault.address, source_address + P, P)

    reply = child.request({"op": "write", "offsets": [2 * P + 1], "value": 0xEE}, resolve_write)
    assert reply == {"ok": True}
    assert [(f.address, f.write) for f in faults] == [(base + 2 * P, True)]

    # Present pages are "already there": 0 bytes placed, no error.
    assert uffd.copy(base, source_address, P) == 0
    assert uffd.zeropage(base + P, P) == 0
    # A range mixing present and missing pages: only the missing ones are placed.
    assert uffd.copy(base, source_address, 4 * P) == P
    assert uffd.zeropage(base, 5 * P) == P

    # No more faults: the pages are visible to the child and in the shared memfd.
    expected = source[:P] + bytes(P) + source[P : P + 1] + b"\xee" + source[P + 2 : 2 * P]
    expected += source[3 * P :] + bytes(P)
    reply = child.request({"op": "digest", "offset": 0, "length": 5 * P})
    assert reply == {"sha256": hashlib.sha256(expected).hexdigest()}
    assert os.pread(fd, 5 * P, 0) == expected


def test_missing_hugetlb_across_processes(
    hugepages: Any, memfd_factory: Callable[..., int], spawn_child: Callable[..., Any]
) -> None:
    size = 2 * HUGE_PAGE_SIZE
    fd = memfd_factory(size, hugetlb=True)
    child = spawn_child(fd, size, "missing", hugetlb=True)
    uffd: Userfaultfd = child.uffd
    source = os.urandom(HUGE_PAGE_SIZE)
    faults: list[PageFault] = []

    def resolve(fault: PageFault) -> None:
        faults.append(fault)
        placed = uffd.copy(
            fault.address, buffer_address(source), HUGE_PAGE_SIZE, page_size=HUGE_PAGE_SIZE
        )
        assert placed == HUGE_PAGE_SIZE

    offset = HUGE_PAGE_SIZE + 12345
    reply = child.request({"op": "read", "offsets": [offset]}, resolve)
    assert reply == {"values": [source[12345]]}
    assert [f.address for f in faults] == [child.address + HUGE_PAGE_SIZE]
    assert (
        uffd.copy(child.address, buffer_address(source), size, page_size=HUGE_PAGE_SIZE)
        == HUGE_PAGE_SIZE
    )
    with pytest.raises(ConfigError, match="2097152-byte pages"):
        uffd.copy(child.address, buffer_address(source), P, page_size=HUGE_PAGE_SIZE)
    assert os.pread(fd, HUGE_PAGE_SIZE, 0) == source


def test_writeprotect_faults_and_wake(memfd_factory: Callable[..., int]) -> None:
    """Synchronous WP mode: a native write to a protected page blocks until unprotected."""
    fd = memfd_factory(2 * P)
    with Userfaultfd.create() as uffd, Mapping(fd, 2 * P) as mapping:
        uffd.api(Feature.WP_HUGETLBFS_SHMEM)
        mapping.buffer[0] = 1  # populate
        ioctls = uffd.register(mapping.address, 2 * P, Mode.WP)
        assert ioctls & Ioctl.WRITEPROTECT
        uffd.writeprotect(mapping.address, 2 * P, protect=True)
        thread = threading.Thread(
            target=libc.memset, args=(ffi.cast("void *", mapping.address), 9, 1)
        )
        thread.start()
        try:
            _wait_readable(uffd)
            [fault] = uffd.read_faults()
            assert fault.address == mapping.address and fault.wp and fault.write
            assert fault.thread_id == 0  # THREAD_ID was not requested
            assert mapping.buffer[0] == 1
            uffd.writeprotect(mapping.address, P, protect=False)  # wakes the writer
            thread.join(10)
            assert not thread.is_alive()
        finally:
            uffd.close()
            thread.join()
        assert mapping.buffer[0] == 9


def test_wake_after_dontwake_copy(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(P)
    source = b"\x42" * P
    with Userfaultfd.create() as uffd, Mapping(fd, P) as mapping:
        uffd.api(Feature(0))
        uffd.register(mapping.address, P, Mode.MISSING)
        thread = threading.Thread(
            target=libc.memset, args=(ffi.cast("void *", mapping.address + 1), 7, 1)
        )
        thread.start()
        try:
            _wait_readable(uffd)
            assert len(uffd.read_faults()) == 1
            assert uffd.copy(mapping.address, buffer_address(source), P, wake=False) == P
            thread.join(0.2)
            assert thread.is_alive()  # placed, but not woken yet
            uffd.wake(mapping.address, P)
            thread.join(10)
            assert not thread.is_alive()
        finally:
            uffd.close()
            thread.join()
        assert bytes(mapping.buffer[:3]) == b"\x42\x07\x42"


def test_minor_fault_and_continue(memfd_factory: Callable[..., int]) -> None:
    fd = memfd_factory(2 * P)
    os.pwrite(fd, b"cached", P)  # in the page cache, not mapped by us yet
    with Userfaultfd.create() as uffd, Mapping(fd, 2 * P) as mapping:
        uffd.api(Feature.MINOR_SHMEM)
        ioctls = uffd.register(mapping.address, 2 * P, Mode.MINOR)
        assert ioctls & Ioctl.CONTINUE
        output = ffi.new("char[6]")
        thread = threading.Thread(
            target=libc.memcpy, args=(output, ffi.cast("void *", mapping.address + P), 6)
        )
        thread.start()
        try:
            _wait_readable(uffd)
            [fault] = uffd.read_faults()
            assert fault.minor and fault.address == mapping.address + P
            assert uffd.continue_(mapping.address + P, P) == P
            thread.join(10)
            assert not thread.is_alive()
        finally:
            uffd.close()
            thread.join()
        assert ffi.buffer(output)[:] == b"cached"


def test_move_within_own_process() -> None:
    import mmap

    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    source = mmap.mmap(-1, 2 * P, flags=private)  # UFFDIO_MOVE needs private anonymous memory
    target = mmap.mmap(-1, 2 * P, flags=private)
    try:
        source[:] = b"\x33" * (2 * P)
        source_address, target_address = buffer_address(source), buffer_address(target)
        with Userfaultfd.create() as uffd:
            uffd.api(Feature.MOVE)
            uffd.register(target_address, 2 * P, Mode.MISSING)
            assert uffd.move(target_address, source_address, 2 * P) == 2 * P
            source[0] = 1  # refills the source with a fresh zero page
            with pytest.raises(KernelError) as info:
                uffd.move(target_address, source_address, P)
            assert info.value.errno == errno.EEXIST
            uffd.unregister(target_address, 2 * P)
        assert target[:] == b"\x33" * (2 * P)
        assert source[1] == 0
    finally:
        source.close()
        target.close()
