"""The destination's fault handler: turns the guest's userfaults into page requests.

``FaultHandler.run`` is a trio task (start it with ``nursery.start``). It reads the
guest's missing-page faults from its userfaultfd, maps each to (block, host page),
skips pages already received, records the rest as requested and asks the owner to
send a page request (``request_page``). ``page_placed``/``pages_placed`` complete
requests; completed requests feed the latency statistics and blocktime.

``note_fault`` is the loop's synchronous step (``trimig.loops``): ``run`` is its trio
driver; an owner that serves faults from an OS thread drives it with
``loops.serve_fd_in_thread`` instead and sends the requests it returns itself. The handler is
thread-safe: faults noted in one thread, pages placed in others, statistics read in trio.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import trio

from ..errors import GuestError
from ..kernel.uffd import Userfaultfd
from ..kernel.uffd_messages import PageFault
from ..loops import serve_fd
from .bitmaps import ReceivedBitmap
from .blocks import GuestRamBlock, PageRequest

LATENCY_BUCKETS = 24
"""postcopy-latency-dist: bucket N counts faults resolved in [2^N, 2^(N+1)) µs;
faults under 1 µs count in bucket 0, those of 2^23 µs or more in the last."""

LATENCY_SAMPLES = 1 << 16
"""Raw latencies kept for exact percentiles: the most recent this many (512 KiB)."""

_FEW_REQUESTS = 8  # up to this many outstanding: compare one by one, else np.isin

RequestPage = Callable[[str, int, int], Awaitable[None]]
"""``await request_page(block, start, length)``: send REQ_PAGES(_ID) on the return path.
It may block (e.g. until a paused migration recovers); the request stays outstanding."""


@attrs.frozen
class FaultStats:
    """Postcopy fault statistics of the destination."""

    requests: int
    """Page requests sent (postcopy-requests)."""
    latency_ns: int
    """Average fault latency, request to placement, of the completed requests."""
    latency_dist: tuple[int, ...]
    """LATENCY_BUCKETS counters (postcopy-latency-dist)."""
    blocktime_ms: int
    """Time during which at least one fault was outstanding (postcopy-blocktime)."""
    faults: int
    """Fault messages read (including ones for pages that had arrived meanwhile)."""
    outstanding: int
    """Requested pages not placed yet."""
    latency_p50_ns: int = 0
    """Median latency of the last LATENCY_SAMPLES completed requests (0 before any)."""
    latency_p99_ns: int = 0
    """99th percentile (nearest rank) of the same samples."""

    def as_qmp(self) -> dict[str, Any]:
        """The query-migrate fields. The workload guest has one thread, so the per-vCPU
        lists have one entry and "all vCPUs blocked" is "the thread blocked"."""
        return {
            "postcopy-requests": self.requests,
            "postcopy-latency": self.latency_ns,
            "postcopy-latency-dist": list(self.latency_dist),
            "postcopy-blocktime": self.blocktime_ms,
            "postcopy-vcpu-blocktime": [self.blocktime_ms],
            "postcopy-vcpu-latency": [self.latency_ns],
            "postcopy-non-vcpu-latency": 0,
            "x-postcopy-latency-p50": self.latency_p50_ns,
            "x-postcopy-latency-p99": self.latency_p99_ns,
        }


def latency_bucket(latency_ns: int) -> int:
    """The postcopy-latency-dist bucket of a latency."""
    micros = latency_ns // 1000
    return min(LATENCY_BUCKETS - 1, max(0, micros.bit_length() - 1))


class FaultHandler:
    """Serves one guest's missing-page faults; one per incoming postcopy migration.

    ``uffd`` is the guest's userfaultfd (it is switched to non-blocking: polling a
    blocking uffd reports an error). ``blocks`` are the guest's RAM blocks, registered
    for MISSING faults; ``received`` is the bitmap the placer maintains. ``clock``
    returns nanoseconds.

    Cancel ``run`` (or stop the thread calling ``note_fault``) before closing the uffd.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        blocks: Sequence[GuestRamBlock],
        received: ReceivedBitmap,
        request_page: RequestPage,
        *,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self._uffd = uffd
        self._blocks = sorted(blocks, key=lambda block: block.address)
        self._starts = [block.address for block in self._blocks]
        for before, after in zip(self._blocks, self._blocks[1:], strict=False):
            if before.end > after.address:
                raise ValueError(
                    f"RAM blocks {before.name!r} and {after.name!r} overlap in the guest"
                )
        self._by_name = {block.name: block for block in self._blocks}
        for name in self._by_name:
            if name not in received:
                raise ValueError(f"RAM block {name!r} has no received bitmap")
        self._received = received
        self._request_page = request_page
        self._clock = clock
        # (block, host offset) -> time the request was recorded (ns); insertion ordered.
        self._requested: dict[tuple[str, int], int] = {}
        self._requests = 0
        self._faults = 0
        self._completed = 0
        self._latency_total_ns = 0
        self._latency_dist = [0] * LATENCY_BUCKETS
        self._samples = np.zeros(LATENCY_SAMPLES, dtype=np.int64)  # ring, by completion
        self._blocked_since: int | None = None
        self._blocktime_ns = 0
        # Guards all of the above: faults are noted and pages placed in several threads.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- task

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve faults until cancelled. Started once the uffd is registered."""
        fd = self._uffd.fileno()
        os.set_blocking(fd, False)
        task_status.started()
        await serve_fd(fd, self._uffd.read_faults, self.note_fault, self._send_request)

    async def handle_fault(self, fault: PageFault) -> None:
        """Handle one fault message (``run`` calls this): note it and send its request
        through ``request_page``. Raises GuestError as ``note_fault`` does."""
        request = self.note_fault(fault)
        if request is not None:
            await self._send_request(request)

    async def _send_request(self, request: PageRequest) -> None:
        await self._request_page(request.block, request.start, request.length)

    def note_fault(self, fault: PageFault) -> PageRequest | None:
        """Record one fault message; return the host page to request, or None if it was
        placed meanwhile (the placement woke the faulting thread). A repeated fault on a
        page still outstanding is requested again but timed from the first.

        Raises GuestError for a fault outside every block or one that is not a
        missing-page fault."""
        if fault.wp or fault.minor:
            kind = "write-protect" if fault.wp else "minor"
            raise GuestError(
                f"unexpected {kind} userfault at {fault.address:#x} (only missing-page "
                "faults are registered during postcopy)"
            )
        block = self._find(fault.address)
        offset = (fault.address - block.address) // block.page_size * block.page_size
        with self._lock:
            self._faults += 1
            # Check and record in one critical section, which pages_placed also enters to
            # look for requests, and placers set received bits before calling it: either
            # the placement is seen here or this request is seen there.
            if self._received.is_received(block.name, offset, block.page_size):
                return None
            key = (block.name, offset)
            if key not in self._requested:
                now = self._clock()
                self._requested[key] = now
                if self._blocked_since is None:
                    self._blocked_since = now
            self._requests += 1
        return PageRequest(block.name, offset, block.page_size)

    # ------------------------------------------------------------ placement

    def page_placed(self, block: str, host_offset: int) -> None:
        """Host page ``host_offset`` of ``block`` is present: complete its request, if any."""
        with self._lock:
            requested_at = self._requested.pop((block, host_offset), None)
            if requested_at is not None:
                self._complete(requested_at)

    def pages_placed(self, block: str, host_offsets: npt.NDArray[np.int64]) -> None:
        """``PagePlacer`` callback: these host pages of ``block`` became present (their
        received bits are set).

        Costs O(outstanding requests x pages), and one lock when none is outstanding (the
        common case while the background stream is placed). The requests are read under
        the lock, never before it: ``note_fault`` records a request after finding its page
        not received, and a placement whose bits were set after that check but whose
        callback looked before the request was recorded would never complete it."""
        if len(host_offsets) == 0:
            return
        with self._lock:
            if not self._requested:
                return
            wanted = [key for key in self._requested if key[0] == block]
            if len(wanted) > _FEW_REQUESTS:
                offsets = np.array([offset for _, offset in wanted], dtype=np.int64)
                hits = np.isin(offsets, host_offsets).tolist()
            else:
                hits = [bool((host_offsets == offset).any()) for _, offset in wanted]
            for key, hit in zip(wanted, hits, strict=True):
                if hit:
                    self._complete(self._requested.pop(key))

    def _complete(self, requested_at: int) -> None:
        """Account one completed request; the caller holds the lock."""
        now = self._clock()
        latency = max(0, now - requested_at)
        self._samples[self._completed % LATENCY_SAMPLES] = latency
        self._completed += 1
        self._latency_total_ns += latency
        self._latency_dist[latency_bucket(latency)] += 1
        if not self._requested and self._blocked_since is not None:
            self._blocktime_ns += max(0, now - self._blocked_since)
            self._blocked_since = None

    # ---------------------------------------------------------- inspection

    def outstanding(self) -> list[PageRequest]:
        """Requested but not yet placed pages, oldest first (re-sent after a recovery)."""
        with self._lock:
            keys = list(self._requested)
        return [PageRequest(name, offset, self._by_name[name].page_size) for name, offset in keys]

    def latencies(self) -> npt.NDArray[np.int64]:
        """The raw latencies (ns) of the last LATENCY_SAMPLES completed requests, a copy,
        in no particular order."""
        with self._lock:
            return self._samples[: min(self._completed, LATENCY_SAMPLES)].copy()

    def stats(self) -> FaultStats:
        """Current statistics; blocktime includes a stall still in progress."""
        with self._lock:
            blocktime = self._blocktime_ns
            if self._blocked_since is not None:
                blocktime += max(0, self._clock() - self._blocked_since)
            average = self._latency_total_ns // self._completed if self._completed else 0
            samples = self._samples[: min(self._completed, LATENCY_SAMPLES)].copy()
            counters = (self._requests, tuple(self._latency_dist), self._faults)
            outstanding = len(self._requested)
        p50 = p99 = 0
        if len(samples):
            p50, p99 = (
                int(value) for value in np.percentile(samples, (50, 99), method="inverted_cdf")
            )
        requests, latency_dist, faults = counters
        return FaultStats(
            requests=requests,
            latency_ns=average,
            latency_dist=latency_dist,
            blocktime_ms=blocktime // 1_000_000,
            faults=faults,
            outstanding=outstanding,
            latency_p50_ns=p50,
            latency_p99_ns=p99,
        )

    def _find(self, address: int) -> GuestRamBlock:
        position = bisect.bisect_right(self._starts, address) - 1
        if position >= 0:
            block = self._blocks[position]
            if address < block.end:
                return block
        raise GuestError(
            f"userfault at {address:#x} outside every registered RAM block "
            f"({', '.join(f'{b.name} {b.address:#x}+{b.size:#x}' for b in self._blocks)})"
        )
