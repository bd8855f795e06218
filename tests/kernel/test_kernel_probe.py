"""The kernel feature probe, on this machine (Linux 6.18, everything available)."""

from __future__ import annotations

import os

import attrs
import pytest

from trimig.errors import ConfigError, MissingKernelFeature
from trimig.kernel import Feature, Ioctl, probe
from trimig.kernel.probe import KernelFeatures


@pytest.fixture(scope="module")
def features() -> KernelFeatures:
    return probe()


def test_probe_finds_what_this_machine_has(features: KernelFeatures) -> None:
    assert features.kernel_release == os.uname().release
    assert features.page_size == 4096
    assert features.userfaultfd and features.userfaultfd_error == ""
    for bit in (
        Feature.WP_ASYNC,
        Feature.WP_HUGETLBFS_SHMEM,
        Feature.MISSING_SHMEM,
        Feature.MISSING_HUGETLBFS,
        Feature.MINOR_SHMEM,
        Feature.MOVE,
    ):
        assert features.uffd_features & bit
    assert features.uffd_ioctls & Ioctl.REGISTER
    assert features.pagemap_scan and features.pagemap_scan_error == ""
    assert features.huge_page_size == 2 * 1024 * 1024
    assert 0 <= features.hugetlb_pages_free <= features.hugetlb_pages_total


def test_probe_counts_free_huge_pages(hugepages: object) -> None:
    snapshot = probe()
    assert snapshot.hugetlb_pages_free >= 8
    snapshot.require("hugetlb", "the test")


def test_require_passes_for_present_features(features: KernelFeatures) -> None:
    features.require("userfaultfd", "postcopy")
    features.require("PAGEMAP_SCAN", "dirty tracking")
    features.require("UFFD_FEATURE_WP_ASYNC", "dirty tracking")
    features.require("MISSING_SHMEM", "postcopy")
    assert features.has("WP_UNPOPULATED")


def test_require_names_the_missing_feature(features: KernelFeatures) -> None:
    without = attrs.evolve(features, uffd_features=features.uffd_features & ~Feature.WP_ASYNC)
    with pytest.raises(MissingKernelFeature) as info:
        without.require("WP_ASYNC", "dirty tracking")
    assert info.value.feature == "UFFD_FEATURE_WP_ASYNC"
    assert "needed for dirty tracking" in str(info.value)

    no_scan = attrs.evolve(features, pagemap_scan=False, pagemap_scan_error="not here")
    with pytest.raises(MissingKernelFeature, match=r"PAGEMAP_SCAN.*not here"):
        no_scan.require("PAGEMAP_SCAN", "dirty tracking")

    no_uffd = attrs.evolve(features, userfaultfd=False, userfaultfd_error="EPERM")
    assert not no_uffd.has("MISSING_SHMEM")
    with pytest.raises(MissingKernelFeature, match="userfaultfd"):
        no_uffd.require("userfaultfd", "postcopy")

    no_huge = attrs.evolve(features, hugetlb_pages_free=0)
    with pytest.raises(MissingKernelFeature, match="nr_hugepages"):
        no_huge.require("hugetlb", "huge RAM blocks")


def test_unknown_feature_names_are_rejected(features: KernelFeatures) -> None:
    with pytest.raises(ConfigError, match="WP_ASYNK"):
        features.require("WP_ASYNK", "a typo")


def test_describe(features: KernelFeatures) -> None:
    report = features.describe()
    assert "userfaultfd:     yes" in report
    assert "UFFD_FEATURE_WP_ASYNC" in report
    assert "PAGEMAP_SCAN:    yes" in report
    assert "huge pages:" in report
    assert "no (" not in report
