"""userfaultfd(2): the API handshake, registration, page placement and reading fault
messages (their values and decoding are ``uffd_messages``).

Every ioctl acts on the memory of the process that *created* the userfaultfd, whoever
calls it. So an engine can place pages into (or write-protect) a guest process's memory
through a uffd that the guest created and sent over ``SCM_RIGHTS``; the source buffer
of :meth:`Userfaultfd.copy` is read from the calling process. ``UFFDIO_MOVE`` is the
exception: the kernel refuses it across processes (``EINVAL``).

A thread that touches a missing page blocks in the kernel. cffi releases the GIL
around its C calls, so a native access faults safely in-process; pure-Python code that
might fault must run in another process.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import os
import time
from typing import Any

from ..errors import ConfigError, KernelError, MissingKernelFeature
from . import _ffi
from ._ffi import errno, ffi, libc
from ._owned import OwnedFd
from .memory import PAGE_SIZE
from .uffd_messages import ForkEvent, PageFault, UffdEvent, decode


class Mode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``: which faults a registered range reports."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits (Linux 6.18)."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks returned by UFFDIO_API and UFFDIO_REGISTER."""

    REGISTER = 1 << _ffi._UFFDIO_REGISTER
    UNREGISTER = 1 << _ffi._UFFDIO_UNREGISTER
    WAKE = 1 << _ffi._UFFDIO_WAKE
    COPY = 1 << _ffi._UFFDIO_COPY
    ZEROPAGE = 1 << _ffi._UFFDIO_ZEROPAGE
    MOVE = 1 << _ffi._UFFDIO_MOVE
    WRITEPROTECT = 1 << _ffi._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << _ffi._UFFDIO_CONTINUE
    POISON = 1 << _ffi._UFFDIO_POISON
    API = 1 << _ffi._UFFDIO_API


def feature_name(feature: Feature) -> str:
    """The kernel's name of one feature bit, e.g. ``"UFFD_FEATURE_WP_ASYNC"``."""
    return f"UFFD_FEATURE_{feature.name}" if feature.name else f"UFFD_FEATURE({int(feature):#x})"


_MSG_SIZE = ffi.sizeof("struct uffd_msg")
_READ_BATCH = 128  # messages per read(2)

# cffi parses a C type string the first time it is used, about 0.4 ms each here: parse
# this module's now, at import, instead of inside a guest's register-missing or on the
# first page a postcopy destination places (both count in the switch-over's downtime).
for _declaration in (
    "struct uffdio_api *",
    "struct uffdio_register *",
    "struct uffdio_range *",
    "struct uffdio_copy *",
    "struct uffdio_zeropage *",
    "struct uffdio_writeprotect *",
    "struct uffdio_continue *",
    "struct uffdio_move *",
    f"struct uffd_msg[{_READ_BATCH}]",
    "unsigned long",
    "int",
):
    ffi.typeof(_declaration)
del _declaration
#: How often an ioctl that makes no progress (EAGAIN: the mappings are changing) is retried.
EAGAIN_RETRIES = 1000


def _ioctl(fd: int, request: int, arg: Any) -> int:
    """ioctl(2); returns 0 or -errno."""
    if libc.ioctl(fd, ffi.cast("unsigned long", request), arg) == 0:
        return 0
    return -errno()


def _create_fd(flags: int) -> int:
    """A new userfaultfd with ``flags`` (O_CLOEXEC|O_NONBLOCK...), via the syscall or /dev."""
    syscall_errno = errno_codes.ENOSYS
    if _ffi.SYS_userfaultfd is not None:
        fd = libc.syscall(_ffi.SYS_userfaultfd, ffi.cast("int", flags))
        if fd >= 0:
            return int(fd)
        syscall_errno = errno()
    if syscall_errno in (errno_codes.EPERM, errno_codes.ENOSYS):
        # The syscall may be forbidden (vm.unprivileged_userfaultfd) while the device is open.
        try:
            device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            device_detail = f"/dev/userfaultfd: {os.strerror(error.errno or 0)}"
        else:
            try:
                fd = libc.ioctl(
                    device,
                    ffi.cast("unsigned long", _ffi.USERFAULTFD_IOC_NEW),
                    ffi.cast("int", flags),
                )
                device_errno = errno()
            finally:
                os.close(device)
            if fd >= 0:
                return int(fd)
            device_detail = f"/dev/userfaultfd: {os.strerror(device_errno)}"
        if syscall_errno == errno_codes.ENOSYS:
            raise MissingKernelFeature("userfaultfd", f"creating a userfaultfd ({device_detail})")
        raise KernelError("userfaultfd", syscall_errno, device_detail)
    raise KernelError("userfaultfd", syscall_errno)


def query_api() -> tuple[Feature, Ioctl]:
    """The features and ioctls the running kernel offers, via UFFDIO_API on a throwaway uffd."""
    fd = _create_fd(_ffi.O_CLOEXEC | _ffi.O_NONBLOCK)
    try:
        api = ffi.new("struct uffdio_api *", {"api": _ffi.UFFD_API, "features": 0})
        result = _ioctl(fd, _ffi.UFFDIO_API, api)
        if result < 0:
            raise KernelError("UFFDIO_API", -result, "probing with features=0")
        return Feature(api.features), Ioctl(api.ioctls)
    finally:
        os.close(fd)


def _check_range(what: str, address: int, length: int, alignment: int = PAGE_SIZE) -> None:
    if address < 0 or length <= 0 or address % alignment or length % alignment:
        raise ConfigError(
            f"{what}: range {address:#x}+{length:#x} is not a non-empty range of whole "
            f"{alignment}-byte pages"
        )


class Userfaultfd(OwnedFd):
    """A userfaultfd. Create one with :meth:`create` or adopt a received fd with
    :meth:`from_fd`; call :meth:`api` once, then register ranges. Closing it (or
    :meth:`close`, or leaving the ``with`` block) unregisters everything and wakes
    any blocked faulting threads."""

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd``, an open userfaultfd (prefer create/from_fd)."""
        self._fd = fd
        self._nonblocking = bool(_fcntl_flags(fd) & os.O_NONBLOCK)
        self.features = Feature(0)  # enabled by api()
        self._buffer = bytearray(_MSG_SIZE * _READ_BATCH)
        self._messages = ffi.from_buffer(f"struct uffd_msg[{_READ_BATCH}]", self._buffer)

    @classmethod
    def create(cls, *, nonblocking: bool = True) -> Userfaultfd:
        """A new userfaultfd for this process (O_CLOEXEC, O_NONBLOCK unless told otherwise;
        kernel faults are reported too, i.e. not UFFD_USER_MODE_ONLY).

        Keep it non-blocking to wait for faults with poll/epoll (trio's wait_readable):
        the kernel reports POLLERR on a blocking userfaultfd.

        Uses the userfaultfd(2) system call, and ``/dev/userfaultfd`` if that is refused.
        """
        flags = _ffi.O_CLOEXEC | (_ffi.O_NONBLOCK if nonblocking else 0)
        return cls(_create_fd(flags))

    @classmethod
    def from_fd(cls, fd: int) -> Userfaultfd:
        """Adopt ``fd`` (e.g. received over SCM_RIGHTS); the object owns and closes it.

        Its API handshake was done by its creator: :meth:`api` must not be called again.
        """
        if fd < 0:
            raise ConfigError(f"Userfaultfd.from_fd: bad fd {fd}")
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as error:
            raise KernelError("readlink", error.errno or 0, f"fd {fd}") from None
        if target != "anon_inode:[userfaultfd]":
            raise ConfigError(f"Userfaultfd.from_fd: fd {fd} is {target!r}, not a userfaultfd")
        return cls(fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the userfaultfd is closed")
        return self._fd

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} features={self.features!r}>"

    # ----------------------------------------------------------------- handshake

    def api(self, features: Feature, *, needed_for: str = "") -> Feature:
        """UFFDIO_API: enable ``features``; returns the features now enabled (the requested
        ones, plus WP_UNPOPULATED which WP_ASYNC implies).

        Raises :class:`MissingKernelFeature` naming the first requested bit the kernel
        lacks (``needed_for`` says why it was wanted). Can succeed only once per uffd.
        """
        api = ffi.new("struct uffdio_api *", {"api": _ffi.UFFD_API, "features": int(features)})
        result = _ioctl(self.fileno(), _ffi.UFFDIO_API, api)
        if result == -errno_codes.EINVAL:
            offered, _ = query_api()
            missing = Feature(int(features) & ~int(offered))
            for bit in Feature:
                if bit & missing:
                    raise MissingKernelFeature(
                        feature_name(bit), needed_for or "the userfaultfd API handshake"
                    )
            if missing:
                raise MissingKernelFeature(feature_name(missing), needed_for)
            raise KernelError(
                "UFFDIO_API", -result, "the API handshake was already done on this userfaultfd"
            )
        if result < 0:
            detail = f"features {features!r}"
            if result == -errno_codes.EPERM:
                detail += " (EVENT_FORK needs CAP_SYS_PTRACE)"
            raise KernelError("UFFDIO_API", -result, detail)
        enabled = Feature(features)
        if enabled & Feature.WP_ASYNC:
            enabled |= Feature.WP_UNPOPULATED
        self.features = enabled
        return enabled

    # -------------------------------------------------------------- registration

    def register(self, address: int, length: int, mode: Mode) -> Ioctl:
        """UFFDIO_REGISTER ``[address, address + length)`` for ``mode`` faults; returns the
        ioctls the kernel allows on that range (:class:`Ioctl`, an ``int``).

        A hugetlb range must be huge page aligned. WP mode on shmem or hugetlb needs
        WP_HUGETLBFS_SHMEM; asynchronous dirty tracking needs WP_ASYNC."""
        _check_range("UFFDIO_REGISTER", address, length)
        if not mode or mode & ~(Mode.MISSING | Mode.WP | Mode.MINOR):
            raise ConfigError(f"UFFDIO_REGISTER: bad mode {mode!r}")
        register = ffi.new(
            "struct uffdio_register *",
            {"range": {"start": address, "len": length}, "mode": int(mode)},
        )
        result = self._retry(_ffi.UFFDIO_REGISTER, register)
        if result < 0:
            raise KernelError(
                "UFFDIO_REGISTER", -result, f"range {address:#x}+{length:#x}, mode {mode!r}"
            )
        return Ioctl(register.ioctls)

    def unregister(self, address: int, length: int) -> None:
        """UFFDIO_UNREGISTER the range; blocked faulting threads in it are woken."""
        _check_range("UFFDIO_UNREGISTER", address, length)
        uffd_range = ffi.new("struct uffdio_range *", {"start": address, "len": length})
        result = self._retry(_ffi.UFFDIO_UNREGISTER, uffd_range)
        if result < 0:
            raise KernelError("UFFDIO_UNREGISTER", -result, f"range {address:#x}+{length:#x}")

    # ---------------------------------------------------------------- placement

    def writeprotect(self, address: int, length: int, *, protect: bool, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: write-protect the range (``protect=True``) or lift the
        protection (waking the threads blocked on it unless ``wake=False``).
        The range must be registered in WP mode."""
        _check_range("UFFDIO_WRITEPROTECT", address, length)
        mode = 0
        if protect:
            mode |= _ffi.UFFDIO_WRITEPROTECT_MODE_WP
        elif not wake:
            mode |= _ffi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        arg = ffi.new(
            "struct uffdio_writeprotect *",
            {"range": {"start": address, "len": length}, "mode": mode},
        )
        result = self._retry(_ffi.UFFDIO_WRITEPROTECT, arg)
        if result < 0:
            raise KernelError(
                "UFFDIO_WRITEPROTECT",
                -result,
                f"range {address:#x}+{length:#x}, protect={protect}",
            )

    def copy(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        wake: bool = True,
        wp: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` (in this process) into the missing
        pages at ``dst`` (in the uffd's process), atomically per page.

        Returns the number of bytes placed. Pages already present (EEXIST) are left
        alone and skipped, ``page_size`` bytes at a time (pass the huge page size for a
        hugetlb range), so a fully present range returns 0. ``wp`` maps the pages
        write-protected. Threads faulting on the placed pages are woken unless
        ``wake=False``."""
        _check_range("UFFDIO_COPY", dst, length, page_size)
        mode = 0 if wake else _ffi.UFFDIO_COPY_MODE_DONTWAKE
        if wp:
            mode |= _ffi.UFFDIO_COPY_MODE_WP
        arg = ffi.new("struct uffdio_copy *", {"mode": mode})

        def issue(offset: int, remaining: int) -> tuple[int, int]:
            arg.dst = dst + offset
            arg.src = src + offset
            arg.len = remaining
            arg.copy = 0
            return _ioctl(self._fd, _ffi.UFFDIO_COPY, arg), arg.copy

        return self._fill("UFFDIO_COPY", issue, dst, length, page_size, skip_existing=True)

    def zeropage(
        self, address: int, length: int, *, wake: bool = True, page_size: int = PAGE_SIZE
    ) -> int:
        """UFFDIO_ZEROPAGE: map zero pages at the missing pages of the range (not on
        hugetlb). Returns the bytes placed; present pages are skipped as in :meth:`copy`."""
        _check_range("UFFDIO_ZEROPAGE", address, length, page_size)
        mode = 0 if wake else _ffi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        arg = ffi.new("struct uffdio_zeropage *", {"mode": mode})

        def issue(offset: int, remaining: int) -> tuple[int, int]:
            arg.range.start = address + offset
            arg.range.len = remaining
            arg.zeropage = 0
            return _ioctl(self._fd, _ffi.UFFDIO_ZEROPAGE, arg), arg.zeropage

        return self._fill("UFFDIO_ZEROPAGE", issue, address, length, page_size, skip_existing=True)

    def continue_(
        self,
        address: int,
        length: int,
        *,
        wake: bool = True,
        wp: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> int:
        """UFFDIO_CONTINUE (MINOR mode): map the page-cache pages already in the file at the
        range. Returns the bytes mapped; already mapped pages are skipped as in :meth:`copy`."""
        _check_range("UFFDIO_CONTINUE", address, length, page_size)
        mode = 0 if wake else _ffi.UFFDIO_CONTINUE_MODE_DONTWAKE
        if wp:
            mode |= _ffi.UFFDIO_CONTINUE_MODE_WP
        arg = ffi.new("struct uffdio_continue *", {"mode": mode})

        def issue(offset: int, remaining: int) -> tuple[int, int]:
            arg.range.start = address + offset
            arg.range.len = remaining
            arg.mapped = 0
            return _ioctl(self._fd, _ffi.UFFDIO_CONTINUE, arg), arg.mapped

        return self._fill("UFFDIO_CONTINUE", issue, address, length, page_size, skip_existing=True)

    def map_from_file(self, address: int, length: int, *, page_size: int = PAGE_SIZE) -> int:
        """UFFDIO_CONTINUE over a MINOR-registered range, skipping the file's holes
        (EFAULT) and pages already mapped (EEXIST): maps what the file holds, allocates
        nothing, wakes nobody. Returns the bytes newly mapped."""
        _check_range("UFFDIO_CONTINUE", address, length, page_size)
        arg = ffi.new("struct uffdio_continue *", {"mode": _ffi.UFFDIO_CONTINUE_MODE_DONTWAKE})

        def issue(offset: int, remaining: int) -> tuple[int, int]:
            arg.range.start = address + offset
            arg.range.len = remaining
            arg.mapped = 0
            return _ioctl(self._fd, _ffi.UFFDIO_CONTINUE, arg), arg.mapped

        return self._fill(
            "UFFDIO_CONTINUE",
            issue,
            address,
            length,
            page_size,
            skip_existing=True,
            skip_holes=True,
        )

    def page_in_file(self, address: int, page_size: int) -> bool:
        """UFFDIO_CONTINUE of the one page at ``address`` of a MINOR-registered mapping:
        True if the file holds the page (it is mapped now, or already was), False where
        the file has a hole (EFAULT). Allocates nothing, wakes nobody. Raises KernelError
        for any other failure."""
        arg = ffi.new(
            "struct uffdio_continue *",
            {
                "range": {"start": address, "len": page_size},
                "mode": _ffi.UFFDIO_CONTINUE_MODE_DONTWAKE,
            },
        )
        result = self._retry(_ffi.UFFDIO_CONTINUE, arg)
        if result == 0 or result == -errno_codes.EEXIST:
            return True
        if result == -errno_codes.EFAULT:
            return False
        raise KernelError("UFFDIO_CONTINUE", -result, f"page {address:#x}+{page_size:#x}")

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        wake: bool = True,
        allow_src_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE the (anonymous) pages at ``src`` to the missing pages at ``dst``.

        Only within the uffd creator's own process (the kernel refuses cross-process
        moves). Returns the bytes moved; a present destination page raises
        :class:`KernelError` (EEXIST)."""
        _check_range("UFFDIO_MOVE", dst, length)
        mode = 0 if wake else _ffi.UFFDIO_MOVE_MODE_DONTWAKE
        if allow_src_holes:
            mode |= _ffi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
        arg = ffi.new("struct uffdio_move *", {"mode": mode})

        def issue(offset: int, remaining: int) -> tuple[int, int]:
            arg.dst = dst + offset
            arg.src = src + offset
            arg.len = remaining
            arg.move = 0
            return _ioctl(self._fd, _ffi.UFFDIO_MOVE, arg), arg.move

        return self._fill("UFFDIO_MOVE", issue, dst, length, PAGE_SIZE, skip_existing=False)

    def wake(self, address: int, length: int) -> None:
        """UFFDIO_WAKE the threads blocked on faults in the range (after DONTWAKE placements)."""
        _check_range("UFFDIO_WAKE", address, length)
        uffd_range = ffi.new("struct uffdio_range *", {"start": address, "len": length})
        result = _ioctl(self.fileno(), _ffi.UFFDIO_WAKE, uffd_range)
        if result < 0:
            raise KernelError("UFFDIO_WAKE", -result, f"range {address:#x}+{length:#x}")

    # ------------------------------------------------------------------ messages

    def read_events(self) -> list[UffdEvent]:
        """Read every queued message without blocking: page faults and, if their features
        were enabled, fork/remap/remove/unmap events. ``[]`` when none is queued."""
        fd = self.fileno()
        events: list[UffdEvent] = []
        while True:
            try:
                if self._nonblocking:
                    size = os.readv(fd, [self._buffer])
                else:
                    # poll() reports POLLERR on a blocking uffd, so ask this read not to wait.
                    size = os.preadv(fd, [self._buffer], -1, os.RWF_NOWAIT)
            except BlockingIOError:
                break
            except OSError as error:
                raise KernelError("read(userfaultfd)", error.errno or 0) from None
            count = size // _MSG_SIZE
            for index in range(count):
                events.append(decode(self._messages[index]))
            if count < _READ_BATCH:
                break
        return events

    def read_faults(self) -> list[PageFault]:
        """Read every queued message without blocking and return the page faults.

        Other events are consumed and dropped (the file descriptors of fork events are
        closed): trimig enables none of the EVENT_* features. Use :meth:`read_events`
        to see them."""
        faults: list[PageFault] = []
        for event in self.read_events():
            if isinstance(event, PageFault):
                faults.append(event)
            elif isinstance(event, ForkEvent):
                os.close(event.fd)
        return faults

    # ------------------------------------------------------------------ helpers

    def _retry(self, request: int, arg: Any) -> int:
        """An ioctl retried while it fails with EAGAIN (mappings changing); 0 or -errno."""
        fd = self.fileno()
        for _ in range(EAGAIN_RETRIES):
            result = _ioctl(fd, request, arg)
            if result != -errno_codes.EAGAIN:
                return result
            time.sleep(0)
        return result

    def _fill(
        self,
        operation: str,
        issue: Any,
        address: int,
        length: int,
        page_size: int,
        *,
        skip_existing: bool,
        skip_holes: bool = False,
    ) -> int:
        """Drive a placing ioctl over the whole range: continue after partial progress,
        retry EAGAIN without progress a bounded number of times, skip present pages
        (``skip_existing``) and, for UFFDIO_CONTINUE, pages the file lacks (``skip_holes``)."""
        self.fileno()
        offset = 0
        placed = 0
        stalls = 0
        while offset < length:
            result, done = issue(offset, length - offset)
            if result == 0:
                return placed + (length - offset)
            if done > 0:  # partial progress (the ioctl then fails with EAGAIN)
                offset += done
                placed += done
                stalls = 0
                continue
            error = -result
            if (error == errno_codes.EEXIST and skip_existing) or (
                error == errno_codes.EFAULT and skip_holes
            ):
                offset += page_size
                continue
            if error == errno_codes.EAGAIN and stalls < EAGAIN_RETRIES:
                stalls += 1
                time.sleep(0)
                continue
            raise KernelError(
                operation,
                error,
                f"range {address + offset:#x}+{length - offset:#x} "
                f"({placed} of {length} bytes placed)",
            )
        return placed


def _fcntl_flags(fd: int) -> int:
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as error:
        raise KernelError("fcntl(F_GETFL)", error.errno or 0, f"fd {fd}") from None
