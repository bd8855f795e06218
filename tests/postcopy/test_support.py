"""The postcopy OS support probe."""

from __future__ import annotations

import attrs
import pytest

from trimig.errors import ConfigError, MissingKernelFeature
from trimig.kernel.probe import probe
from trimig.kernel.uffd import Feature, Ioctl
from trimig.postcopy.support import check_postcopy_support, range_ioctls, required_ioctls


@attrs.frozen
class Layout:
    name: str
    size: int
    page_size: int = 4096


BLOCKS = [Layout("pc.ram", 1 << 20), Layout("huge", 4 << 20, 2 << 20)]


def test_this_machine_supports_postcopy() -> None:
    check_postcopy_support(BLOCKS, probe())


def test_registered_ranges_offer_the_placement_ioctls() -> None:
    small = range_ioctls(hugetlb=False)
    assert required_ioctls(False) & ~small == 0
    assert small & Ioctl.ZEROPAGE
    huge = range_ioctls(hugetlb=True)  # MAP_NORESERVE: needs no free huge page
    assert required_ioctls(True) & ~huge == 0
    assert not huge & Ioctl.ZEROPAGE


def test_missing_features_name_the_block() -> None:
    features = probe()
    no_hugetlbfs = attrs.evolve(
        features, uffd_features=features.uffd_features & ~Feature.MISSING_HUGETLBFS
    )
    check_postcopy_support(BLOCKS[:1], no_hugetlbfs)
    with pytest.raises(
        MissingKernelFeature, match=r"UFFD_FEATURE_MISSING_HUGETLBFS .*RAM block 'huge'"
    ):
        check_postcopy_support(BLOCKS, no_hugetlbfs)
    no_shmem = attrs.evolve(features, uffd_features=Feature.MISSING_HUGETLBFS)
    with pytest.raises(MissingKernelFeature, match=r"UFFD_FEATURE_MISSING_SHMEM .*'pc\.ram'"):
        check_postcopy_support(BLOCKS, no_shmem)
    no_uffd = attrs.evolve(
        features, userfaultfd=False, userfaultfd_error="userfaultfd: Operation not permitted"
    )
    with pytest.raises(MissingKernelFeature, match=r"userfaultfd .*not permitted"):
        check_postcopy_support(BLOCKS, no_uffd)


def test_block_size_must_be_whole_pages() -> None:
    with pytest.raises(ConfigError, match="not a positive multiple of its page size"):
        check_postcopy_support([Layout("huge", 3 << 20, 2 << 20)], probe())
