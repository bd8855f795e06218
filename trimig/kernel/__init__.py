"""Kernel bindings (cffi in ABI mode, no compiler, no trio): memfds and mappings,
userfaultfd, PAGEMAP_SCAN dirty tracking and a probe of what the kernel offers; gather and
scatter I/O (``kernel.iov``) and fd passing (``kernel.fdpass``). The only home of system
calls and fd plumbing: the layers above drive these synchronous steps from trio or threads."""

from .memory import (
    HUGE_PAGE_SIZE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    PAGE_SIZE,
    Mapping,
    buffer_address,
    memfd_create,
    punch_hole,
)
from .pagemap import PagemapScanner
from .probe import KernelFeatures, probe
from .uffd import Feature, Ioctl, Mode, Userfaultfd, feature_name, query_api
from .uffd_messages import ForkEvent, PageFault, RemapEvent, RemoveEvent, UffdEvent

__all__ = [
    "HUGE_PAGE_SIZE",
    "MADV_DONTNEED",
    "MADV_HUGEPAGE",
    "MADV_NOHUGEPAGE",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MADV_REMOVE",
    "PAGE_SIZE",
    "Feature",
    "ForkEvent",
    "Ioctl",
    "KernelFeatures",
    "Mapping",
    "Mode",
    "PageFault",
    "PagemapScanner",
    "RemapEvent",
    "RemoveEvent",
    "UffdEvent",
    "Userfaultfd",
    "buffer_address",
    "feature_name",
    "memfd_create",
    "probe",
    "punch_hole",
    "query_api",
]
