"""What the running kernel offers: userfaultfd and its features, PAGEMAP_SCAN, huge pages.

:func:`probe` asks the kernel each time it is called; callers keep the result.
"""

from __future__ import annotations

import errno as errno_codes
import mmap
import os

import attrs

from ..errors import ConfigError, KernelError, MissingKernelFeature
from . import _ffi
from ._ffi import errno, ffi, libc
from .memory import HUGE_PAGE_SIZE, PAGE_SIZE
from .uffd import Feature, Ioctl, feature_name, query_api

_HUGEPAGES_SYSFS = f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE_SIZE // 1024}kB"


@attrs.frozen
class KernelFeatures:
    """A snapshot of the kernel's abilities. ``*_error`` says why something is missing."""

    kernel_release: str
    page_size: int
    userfaultfd: bool
    userfaultfd_error: str
    uffd_features: Feature
    uffd_ioctls: Ioctl
    pagemap_scan: bool
    pagemap_scan_error: str
    huge_page_size: int
    hugetlb_pages_total: int
    hugetlb_pages_free: int

    def has(self, feature: str) -> bool:
        """Whether ``feature`` is available. Names: ``"userfaultfd"``, ``"PAGEMAP_SCAN"``,
        ``"hugetlb"`` (free 2 MiB pages), or a uffd feature as ``"UFFD_FEATURE_WP_ASYNC"``
        or ``"WP_ASYNC"``. An unknown name raises :class:`ConfigError`."""
        if feature == "userfaultfd":
            return self.userfaultfd
        if feature == "PAGEMAP_SCAN":
            return self.pagemap_scan
        if feature == "hugetlb":
            return self.hugetlb_pages_free > 0
        bit = _feature_bit(feature)
        return self.userfaultfd and bool(self.uffd_features & bit)

    def require(self, feature: str, needed_for: str) -> None:
        """Raise :class:`MissingKernelFeature` if ``feature`` (a name as in :meth:`has`)
        is missing; ``needed_for`` says what wanted it."""
        if self.has(feature):
            return
        if feature.startswith("UFFD_FEATURE_") or feature in Feature.__members__:
            name = feature_name(_feature_bit(feature))
            if not self.userfaultfd:
                needed_for = (
                    f"{needed_for}; userfaultfd itself is unavailable: {self.userfaultfd_error}"
                )
            raise MissingKernelFeature(name, needed_for)
        if feature == "userfaultfd" and self.userfaultfd_error:
            needed_for = f"{needed_for} ({self.userfaultfd_error})"
        elif feature == "PAGEMAP_SCAN" and self.pagemap_scan_error:
            needed_for = f"{needed_for} ({self.pagemap_scan_error})"
        elif feature == "hugetlb":
            feature = f"free {HUGE_PAGE_SIZE // 1024} kB huge pages"
            needed_for = f"{needed_for} (raise {_HUGEPAGES_SYSFS}/nr_hugepages)"
        raise MissingKernelFeature(feature, needed_for)

    def describe(self) -> str:
        """A human-readable report, one fact per line."""
        lines = [
            f"kernel:          {self.kernel_release}",
            f"page size:       {self.page_size}",
        ]
        if self.userfaultfd:
            lines.append("userfaultfd:     yes")
            for bit in Feature:
                mark = "yes" if self.uffd_features & bit else "no"
                lines.append(f"  {feature_name(bit):<34} {mark}")
            ioctls = ", ".join(str(bit.name) for bit in Ioctl if self.uffd_ioctls & bit)
            lines.append(f"  API ioctls: {ioctls}")
        else:
            lines.append(f"userfaultfd:     no ({self.userfaultfd_error})")
        if self.pagemap_scan:
            lines.append("PAGEMAP_SCAN:    yes")
        else:
            lines.append(f"PAGEMAP_SCAN:    no ({self.pagemap_scan_error})")
        lines.append(
            f"huge pages:      {self.hugetlb_pages_free} of {self.hugetlb_pages_total} free "
            f"({self.huge_page_size // 1024} kB each)"
        )
        return "\n".join(lines)


def probe() -> KernelFeatures:
    """Ask the kernel what it offers. Never raises for a missing feature."""
    features, ioctls = Feature(0), Ioctl(0)
    uffd_error = ""
    try:
        features, ioctls = query_api()
    except (KernelError, MissingKernelFeature) as error:
        uffd_error = str(error)
    scan_error = _probe_pagemap_scan()
    total, free = _hugetlb_pages()
    return KernelFeatures(
        kernel_release=os.uname().release,
        page_size=PAGE_SIZE,
        userfaultfd=not uffd_error,
        userfaultfd_error=uffd_error,
        uffd_features=features,
        uffd_ioctls=ioctls,
        pagemap_scan=not scan_error,
        pagemap_scan_error=scan_error,
        huge_page_size=HUGE_PAGE_SIZE,
        hugetlb_pages_total=total,
        hugetlb_pages_free=free,
    )


def _feature_bit(feature: str) -> Feature:
    name = feature.removeprefix("UFFD_FEATURE_")
    try:
        return Feature[name]
    except KeyError:
        raise ConfigError(
            f"unknown kernel feature name {feature!r}: expected userfaultfd, PAGEMAP_SCAN, "
            f"hugetlb or one of {', '.join(feature_name(bit) for bit in Feature)}"
        ) from None


def _probe_pagemap_scan() -> str:
    """'' if PAGEMAP_SCAN works on /proc/self/pagemap over one page, else why not."""
    page = mmap.mmap(-1, PAGE_SIZE)
    try:
        page[0] = 1  # populate it
        with ffi.from_buffer(page) as cdata:
            address = int(ffi.cast("uintptr_t", cdata))
        vector = ffi.new("struct page_region[1]")
        arg = ffi.new(
            "struct pm_scan_arg *",
            {
                "size": ffi.sizeof("struct pm_scan_arg"),
                "start": address,
                "end": address + PAGE_SIZE,
                "vec": int(ffi.cast("uintptr_t", vector)),
                "vec_len": 1,
                "category_mask": _ffi.PAGE_IS_PRESENT,
                "return_mask": _ffi.PAGE_IS_PRESENT,
            },
        )
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            return f"cannot open /proc/self/pagemap: {os.strerror(error.errno or 0)}"
        try:
            count = libc.ioctl(fd, ffi.cast("unsigned long", _ffi.PAGEMAP_SCAN), arg)
            error_code = errno()
        finally:
            os.close(fd)
        if count < 0:
            if error_code in (errno_codes.ENOTTY, errno_codes.EINVAL):
                return "the PAGEMAP_SCAN ioctl is not implemented (Linux 6.7+ needed)"
            return f"PAGEMAP_SCAN failed: {os.strerror(error_code)}"
        if count != 1 or vector[0].start != address:
            return "PAGEMAP_SCAN did not report a present page"
        return ""
    finally:
        page.close()


def _hugetlb_pages() -> tuple[int, int]:
    """(total, free) 2 MiB huge pages; (0, 0) where the kernel has none."""
    values = []
    for name in ("nr_hugepages", "free_hugepages"):
        try:
            with open(f"{_HUGEPAGES_SYSFS}/{name}") as file:
                values.append(int(file.read()))
        except (OSError, ValueError):
            return 0, 0
    return values[0], values[1]
