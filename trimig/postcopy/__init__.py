"""Postcopy building blocks (no sockets, no migration state machine of their own).

Destination: ``PostcopyStateMachine`` (sub-state), ``ReceivedBitmap``,
``PagePlacer`` (atomic placement through the guest's userfaultfd), ``FaultHandler``
(faults -> page requests, latency and blocktime), ``check_postcopy_support``.
Source: ``canonicalize``/``dirty_ranges``/``batch`` (discard phase) and
``PageRequestQueue``.
"""

from .bitmaps import PageBitmap, ReceivedBitmap, dump_bitmap, le_bitmap_size
from .blocks import TARGET_PAGE_SIZE, BlockLayout, GuestRamBlock, PageRequest
from .discard import MAX_DISCARDS_PER_COMMAND, batch, canonicalize, dirty_ranges
from .faults import LATENCY_BUCKETS, FaultHandler, FaultStats
from .placer import MAIN_CHANNEL, PREEMPT_CHANNEL, PagePlacer, PlacerStats
from .source import PageRequestQueue
from .state import PostcopyState, PostcopyStateMachine
from .support import check_postcopy_support

__all__ = [
    "LATENCY_BUCKETS",
    "MAIN_CHANNEL",
    "MAX_DISCARDS_PER_COMMAND",
    "PREEMPT_CHANNEL",
    "TARGET_PAGE_SIZE",
    "BlockLayout",
    "FaultHandler",
    "FaultStats",
    "GuestRamBlock",
    "PageBitmap",
    "PagePlacer",
    "PageRequest",
    "PageRequestQueue",
    "PlacerStats",
    "PostcopyState",
    "PostcopyStateMachine",
    "ReceivedBitmap",
    "batch",
    "canonicalize",
    "check_postcopy_support",
    "dirty_ranges",
    "dump_bitmap",
    "le_bitmap_size",
]
