"""Can this host run the destination side of postcopy for these blocks?

``check_postcopy_support`` is the OS support probe run when postcopy-ram is set on
the destination (and again at ADVISE): userfaultfd must exist, offer missing-page
faults on shared memory (memfd blocks) and on hugetlbfs (hugetlb blocks), and a
registered range of each kind must allow UFFDIO_COPY and UFFDIO_WAKE, plus
UFFDIO_ZEROPAGE for 4 KiB blocks (hugetlb has none; zero huge pages are copied).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

from ..errors import KernelError, MissingKernelFeature
from ..kernel.memory import HUGE_PAGE_SIZE, PAGE_SIZE, buffer_address, memfd_create
from ..kernel.probe import KernelFeatures
from ..kernel.uffd import Feature, Ioctl, Mode, Userfaultfd
from .blocks import TARGET_PAGE_SIZE, BlockLayout, check_layout

_MAP_NORESERVE = 0x4000  # not exported by Python's mmap module; same value on every Linux arch


def required_ioctls(hugetlb: bool) -> Ioctl:
    """The range ioctls postcopy placement needs on a block of that kind."""
    needed = Ioctl.COPY | Ioctl.WAKE
    return needed if hugetlb else needed | Ioctl.ZEROPAGE


def range_ioctls(*, hugetlb: bool) -> Ioctl:
    """Register a one-page test area of a memfd of that kind for MISSING faults and
    return the ioctls the kernel allows on it. The area is never touched.

    The hugetlb area is mapped MAP_NORESERVE, so no free huge page is needed."""
    feature = Feature.MISSING_HUGETLBFS if hugetlb else Feature.MISSING_SHMEM
    size = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
    fd = memfd_create("trimig:postcopy-probe", hugetlb=hugetlb)
    try:
        os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | (_MAP_NORESERVE if hugetlb else 0)
        try:
            area = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            raise KernelError("mmap", error.errno or 0, "postcopy probe test area") from None
        try:
            with Userfaultfd.create() as uffd:
                uffd.api(feature, needed_for="postcopy placement")
                address = buffer_address(area)
                ioctls = uffd.register(address, size, Mode.MISSING)
                uffd.unregister(address, size)
                return ioctls
        finally:
            area.close()
    finally:
        os.close(fd)


def check_postcopy_support(
    blocks: Iterable[BlockLayout], features: KernelFeatures, *, test_registration: bool = True
) -> None:
    """Raise MissingKernelFeature naming what is missing and for which block, or
    ConfigError for a block postcopy cannot handle (size not a multiple of its page
    size). ``features`` is ``trimig.kernel.probe.probe()``'s snapshot.

    With ``test_registration`` (default) a test area of each kind of block is
    registered to check the range ioctls (see ``range_ioctls``).
    """
    block_list = list(blocks)
    for block in block_list:
        check_layout(block)
    names = ", ".join(repr(block.name) for block in block_list) or "no RAM blocks"
    features.require("userfaultfd", f"postcopy (RAM blocks {names})")
    kinds: dict[bool, str] = {}
    for block in block_list:
        hugetlb = block.page_size != TARGET_PAGE_SIZE
        kind = "hugetlb" if hugetlb else "memfd"
        feature = "MISSING_HUGETLBFS" if hugetlb else "MISSING_SHMEM"
        features.require(
            f"UFFD_FEATURE_{feature}",
            f"postcopy of RAM block {block.name!r} ({kind}, page size {block.page_size})",
        )
        kinds.setdefault(hugetlb, block.name)
    if not test_registration:
        return
    for hugetlb, name in kinds.items():
        offered = range_ioctls(hugetlb=hugetlb)
        missing = required_ioctls(hugetlb) & ~offered
        for bit in Ioctl:
            if bit & missing:
                kind = "hugetlb" if hugetlb else "memfd"
                raise MissingKernelFeature(
                    f"UFFDIO_{bit.name}",
                    f"postcopy placement into RAM block {name!r} ({kind}); a registered "
                    f"range offers only {offered!r}",
                )
