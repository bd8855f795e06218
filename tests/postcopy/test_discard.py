"""Discard phase: canonicalisation, dirty ranges and batching, against naive references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimig.postcopy.discard import (
    MAX_DISCARDS_PER_COMMAND,
    batch,
    canonicalize,
    dirty_ranges,
)

pages_per_host = st.sampled_from([1, 2, 4, 16, 512])


def naive_canonicalize(dirty: list[bool], per_host: int) -> list[bool]:
    result = list(dirty)
    for host in range(0, len(dirty), per_host):
        if any(dirty[host : host + per_host]):
            for page in range(host, host + per_host):
                result[page] = True
    return result


def naive_ranges(dirty: list[bool], page_size: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for page, bit in enumerate(dirty):
        if not bit:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == page * page_size:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + page_size)
        else:
            ranges.append((page * page_size, page_size))
    return ranges


@st.composite
def dirty_maps(draw: st.DrawFn) -> tuple[list[bool], int]:
    """A dirty map of whole host pages, built from a few runs of dirty pages (runs that
    start or end inside host pages are the interesting case)."""
    per_host = draw(pages_per_host)
    npages = per_host * draw(st.integers(0, 6 if per_host == 512 else 40))
    bits = [False] * npages
    for _ in range(draw(st.integers(0, 10)) if npages else 0):
        start = draw(st.integers(0, npages - 1))
        length = draw(st.integers(1, min(npages - start, 2 * per_host + 3)))
        bits[start : start + length] = [True] * length
    return bits, per_host


@given(dirty_maps())
def test_canonicalize_matches_naive(case: tuple[list[bool], int]) -> None:
    bits, per_host = case
    result = canonicalize(np.array(bits, dtype=bool), per_host)
    assert result.tolist() == naive_canonicalize(bits, per_host)
    # Every host page is all dirty or all clean, and no dirty bit was lost.
    hosts = result.reshape(-1, per_host) if result.size else result.reshape(0, per_host)
    assert (hosts.all(axis=1) | ~hosts.any(axis=1)).all()
    assert (result | ~np.array(bits, dtype=bool)).all()


@given(dirty_maps(), st.sampled_from([4096, 1024]))
def test_dirty_ranges_match_naive(case: tuple[list[bool], int], page_size: int) -> None:
    bits, _ = case
    assert dirty_ranges(np.array(bits, dtype=bool), page_size) == naive_ranges(bits, page_size)


@given(
    st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 30)), max_size=60),
    st.integers(1, 20),
)
def test_batch_preserves_order_and_limits(ranges: list[tuple[int, int]], limit: int) -> None:
    batches = batch(ranges, limit)
    assert [item for group in batches for item in group] == ranges
    assert all(1 <= len(group) <= limit for group in batches)
    assert all(len(group) == limit for group in batches[:-1])


def test_batch_default_is_twelve_per_command() -> None:
    ranges = [(index * 8192, 4096) for index in range(25)]
    assert [len(group) for group in batch(ranges)] == [12, 12, 1]
    assert MAX_DISCARDS_PER_COMMAND == 12
    assert batch([]) == []


def test_canonicalize_hugepage_example() -> None:
    dirty = np.zeros(1024, dtype=bool)
    dirty[511] = True  # last target page of the first huge page
    result = canonicalize(dirty, 512)
    assert result[:512].all() and not result[512:].any()
    assert dirty_ranges(result) == [(0, 2 << 20)]
    assert not dirty[0]  # the input is left alone


def test_canonicalize_rejects_partial_host_page() -> None:
    with pytest.raises(ValueError, match="not a whole number of 4-page host pages"):
        canonicalize(np.zeros(6, dtype=bool), 4)
