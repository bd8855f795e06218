"""cffi declarations (ABI mode, no compiler): userfaultfd and PAGEMAP_SCAN structs, libc calls
(the memory calls, and writev/pwritev/process_vm_readv over ``struct iovec`` arrays).

The layouts follow ``include/uapi/linux/userfaultfd.h`` and ``include/uapi/linux/fs.h``
of Linux 6.18. ioctl request numbers are computed from the struct sizes with the
generic ``_IOC`` encoding (x86, arm64, riscv: 2 direction bits at 30, 14 size bits at 16).

``ffi`` and ``libc`` are immutable after import (the declarations and the opened C
library); they hold no per-call state. cffi releases the GIL around every C call.
"""

from __future__ import annotations

import platform
from typing import Any

import cffi

ffi = cffi.FFI()

ffi.cdef(
    """
    struct uffdio_api {
        uint64_t api;
        uint64_t features;
        uint64_t ioctls;
    };
    struct uffdio_range {
        uint64_t start;
        uint64_t len;
    };
    struct uffdio_register {
        struct uffdio_range range;
        uint64_t mode;
        uint64_t ioctls;
    };
    struct uffdio_copy {
        uint64_t dst;
        uint64_t src;
        uint64_t len;
        uint64_t mode;
        int64_t copy;
    };
    struct uffdio_zeropage {
        struct uffdio_range range;
        uint64_t mode;
        int64_t zeropage;
    };
    struct uffdio_writeprotect {
        struct uffdio_range range;
        uint64_t mode;
    };
    struct uffdio_continue {
        struct uffdio_range range;
        uint64_t mode;
        int64_t mapped;
    };
    struct uffdio_poison {
        struct uffdio_range range;
        uint64_t mode;
        int64_t updated;
    };
    struct uffdio_move {
        uint64_t dst;
        uint64_t src;
        uint64_t len;
        uint64_t mode;
        int64_t move;
    };

    struct page_region {
        uint64_t start;
        uint64_t end;
        uint64_t categories;
    };
    struct pm_scan_arg {
        uint64_t size;
        uint64_t flags;
        uint64_t start;
        uint64_t end;
        uint64_t walk_end;
        uint64_t vec;
        uint64_t vec_len;
        uint64_t max_pages;
        uint64_t category_inverted;
        uint64_t category_mask;
        uint64_t category_anyof_mask;
        uint64_t return_mask;
    };

    long syscall(long number, ...);
    int ioctl(int fd, unsigned long request, ...);
    int fallocate(int fd, int mode, int64_t offset, int64_t len);
    int madvise(void *addr, size_t length, int advice);
    int mincore(void *addr, size_t length, unsigned char *vec);
    void *memset(void *s, int c, size_t n);
    void *memcpy(void *dest, const void *src, size_t n);

    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, long offset);
    ssize_t process_vm_readv(int pid, const struct iovec *local_iov, unsigned long liovcnt,
                             const struct iovec *remote_iov, unsigned long riovcnt,
                             unsigned long flags);
    """
)

# struct uffd_msg is __packed in the kernel header: 8 bytes of header, a 24-byte union.
ffi.cdef(
    """
    struct uffd_msg {
        uint8_t event;
        uint8_t reserved1;
        uint16_t reserved2;
        uint32_t reserved3;
        union {
            struct {
                uint64_t flags;
                uint64_t address;
                union {
                    uint32_t ptid;
                } feat;
            } pagefault;
            struct {
                uint32_t ufd;
            } fork;
            struct {
                uint64_t from;
                uint64_t to;
                uint64_t len;
            } remap;
            struct {
                uint64_t start;
                uint64_t end;
            } remove;
            struct {
                uint64_t reserved1;
                uint64_t reserved2;
                uint64_t reserved3;
            } reserved;
        } arg;
    };
    """,
    packed=True,
)

libc: Any = ffi.dlopen(None)

# ---------------------------------------------------------------------------
# ioctl request encoding (asm-generic/ioctl.h)

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _ior(type_: int, nr: int, struct: str) -> int:
    return _ioc(_IOC_READ, type_, nr, ffi.sizeof(struct))


def _iowr(type_: int, nr: int, struct: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(struct))


# userfaultfd ioctl command numbers (the bit index in the "ioctls" masks)
UFFDIO = 0xAA
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

UFFD_API = 0xAA

UFFDIO_API = _iowr(UFFDIO, _UFFDIO_API, "struct uffdio_api")
UFFDIO_REGISTER = _iowr(UFFDIO, _UFFDIO_REGISTER, "struct uffdio_register")
UFFDIO_UNREGISTER = _ior(UFFDIO, _UFFDIO_UNREGISTER, "struct uffdio_range")
UFFDIO_WAKE = _ior(UFFDIO, _UFFDIO_WAKE, "struct uffdio_range")
UFFDIO_COPY = _iowr(UFFDIO, _UFFDIO_COPY, "struct uffdio_copy")
UFFDIO_ZEROPAGE = _iowr(UFFDIO, _UFFDIO_ZEROPAGE, "struct uffdio_zeropage")
UFFDIO_MOVE = _iowr(UFFDIO, _UFFDIO_MOVE, "struct uffdio_move")
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, _UFFDIO_WRITEPROTECT, "struct uffdio_writeprotect")
UFFDIO_CONTINUE = _iowr(UFFDIO, _UFFDIO_CONTINUE, "struct uffdio_continue")
UFFDIO_POISON = _iowr(UFFDIO, _UFFDIO_POISON, "struct uffdio_poison")

# /dev/userfaultfd
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _io(USERFAULTFD_IOC, 0x00)

# uffd_msg.event
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

# uffd_msg.arg.pagefault.flags
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# ioctl modes
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# flags of the userfaultfd(2) system call
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

# PAGEMAP_SCAN (linux/fs.h)
PAGEMAP_SCAN = _iowr(ord("f"), 16, "struct pm_scan_arg")
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

# fallocate(2)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# userfaultfd(2) system call numbers, per architecture
_SYS_USERFAULTFD = {
    "x86_64": 323,
    "aarch64": 282,
    "riscv64": 282,
    "ppc64le": 364,
    "s390x": 355,
}
SYS_userfaultfd: int | None = _SYS_USERFAULTFD.get(platform.machine())


def errno() -> int:
    """The errno left by the last C call of this thread."""
    return int(ffi.errno)
