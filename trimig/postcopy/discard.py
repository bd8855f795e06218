"""The source's discard phase: canonicalise the dirty map, turn it into byte ranges,
batch the ranges per POSTCOPY_RAM_DISCARD command.

All functions are pure and vectorised (no per-page Python loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..codec.constants import MAX_DISCARDS_PER_COMMAND as MAX_DISCARDS_PER_COMMAND
from .bitmaps import bool_runs
from .blocks import TARGET_PAGE_SIZE

Range = tuple[int, int]


def canonicalize(dirty: npt.ArrayLike, pages_per_host_page: int) -> npt.NDArray[np.bool_]:
    """Return a copy of ``dirty`` (one bool per target page) in which every host page
    of ``pages_per_host_page`` target pages is either all dirty or all clean: a host
    page with any dirty target page becomes entirely dirty.

    Raises ValueError if the length is not a whole number of host pages.
    """
    bits = np.asarray(dirty, dtype=np.bool_)
    if bits.ndim != 1:
        raise ValueError(f"a dirty map is 1-D, got shape {bits.shape}")
    if pages_per_host_page < 1:
        raise ValueError(f"pages_per_host_page must be >= 1, got {pages_per_host_page}")
    if bits.shape[0] % pages_per_host_page:
        raise ValueError(
            f"a dirty map of {bits.shape[0]} target pages is not a whole number of "
            f"{pages_per_host_page}-page host pages"
        )
    if pages_per_host_page == 1:
        return bits.copy()
    host_dirty = bits.reshape(-1, pages_per_host_page).any(axis=1)
    return np.repeat(host_dirty, pages_per_host_page)


def dirty_ranges(dirty: npt.ArrayLike, page_size: int = TARGET_PAGE_SIZE) -> list[Range]:
    """``(start, length)`` in bytes of every run of dirty pages, in order.

    ``page_size`` is the size one bit stands for (the target page).
    """
    bits = np.asarray(dirty, dtype=np.bool_)
    if bits.ndim != 1:
        raise ValueError(f"a dirty map is 1-D, got shape {bits.shape}")
    starts, counts = bool_runs(bits)
    return list(zip((starts * page_size).tolist(), (counts * page_size).tolist(), strict=True))


def batch(
    ranges: Sequence[Range], max_per_command: int = MAX_DISCARDS_PER_COMMAND
) -> list[list[Range]]:
    """Split ``ranges`` into consecutive groups of at most ``max_per_command``
    (one POSTCOPY_RAM_DISCARD command each); no ranges gives no commands."""
    if max_per_command < 1:
        raise ValueError(f"max_per_command must be >= 1, got {max_per_command}")
    return [list(ranges[i : i + max_per_command]) for i in range(0, len(ranges), max_per_command)]
