"""The source's postcopy page-request queue.

The return-path reader ``put``s every REQ_PAGES / REQ_PAGES_ID it decodes; the
RAM sender takes them with ``get_nowait`` (between background pages) or ``await
get()``. A reader that answers a request at once (on the urgent channel) only
``resolve``s it: validated and counted, not queued. (The background scan continues
right after a requested page, since the guest is likely to touch its neighbours next:
``UrgentSender`` moves ``RamSaver``'s cursor when it sends one.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import trio

from ..errors import RemoteProtocolError
from .blocks import BlockLayout, PageRequest, check_layout


class PageRequestQueue:
    """Validated FIFO of page requests for one outgoing migration.

    Every request handed to ``put`` counts in ``requests`` (postcopy-requests),
    valid or not. Invalid ones raise RemoteProtocolError and are not queued.
    """

    def __init__(self, blocks: Iterable[BlockLayout]) -> None:
        self._layouts: dict[str, tuple[int, int]] = {}
        for block in blocks:
            check_layout(block)
            self._layouts[block.name] = (block.size, block.page_size)
        self._queue: deque[PageRequest] = deque()
        self._waiters = trio.lowlevel.ParkingLot()
        self._last_block: str | None = None
        self.requests = 0
        """postcopy-requests: page requests received."""

    def put(self, block: str | None, start: int, length: int) -> PageRequest:
        """Validate and queue one request; ``block`` None means "same block as the
        previous request" (REQ_PAGES). Returns the queued request."""
        request = self.resolve(block, start, length)
        self.push(request)
        return request

    def resolve(self, block: str | None, start: int, length: int) -> PageRequest:
        """Validate and count one request without queueing it (``put`` does both).

        Plain Python, no trio: the source's return-path thread may call it, provided
        that it is then the only caller of ``put``/``resolve``."""
        self.requests += 1
        if block is None:
            if self._last_block is None:
                raise RemoteProtocolError(
                    f"REQ_PAGES (start {start:#x}, length {length:#x}) without a block name "
                    "and no previous request named one"
                )
            block = self._last_block
        else:
            if block not in self._layouts:
                raise RemoteProtocolError(f"page request names unknown RAM block {block!r}")
            self._last_block = block
        size, page_size = self._layouts[block]
        if length <= 0 or start < 0 or start % page_size or length % page_size:
            raise RemoteProtocolError(
                f"page request in RAM block {block!r} (start {start:#x}, length {length:#x}) "
                f"is not aligned to the block's page size {page_size:#x}"
            )
        if start + length > size:
            raise RemoteProtocolError(
                f"page request in RAM block {block!r} (start {start:#x}, length {length:#x}) "
                f"runs past the block's end {size:#x}"
            )
        return PageRequest(block, start, length)

    def push(self, request: PageRequest) -> None:
        """Queue a resolved request (from trio)."""
        self._queue.append(request)
        self._waiters.unpark_all()

    def get_nowait(self) -> PageRequest | None:
        """Take the oldest request, or None when there is none."""
        if not self._queue:
            return None
        return self._queue.popleft()

    async def get(self) -> PageRequest:
        """Wait for and take the oldest request."""
        await self.wait_pending()
        request = self.get_nowait()
        assert request is not None
        return request

    async def wait_pending(self) -> None:
        """Return once at least one request is queued (without taking it).

        Lets the sender cut a rate-limit sleep short:
        ``with trio.move_on_after(delay): await queue.wait_pending()``.
        """
        await trio.lowlevel.checkpoint()
        while not self._queue:
            await self._waiters.park()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def pending(self) -> bool:
        """True while requests are queued (the sender keeps going past its rate limit)."""
        return bool(self._queue)

    def reset(self) -> None:
        """For postcopy recovery: drop queued requests and the previous block (the
        destination re-sends its outstanding requests, naming blocks)."""
        self._queue.clear()
        self._last_block = None
