"""The state of one outgoing migration, shared by its phases.

``OutgoingMigration`` (outgoing.py) is built in layers, one concern each, every layer a
subclass of the one below:

- ``SourceState`` (here): the migration's state, what is derived from it, the small
  steps every phase takes (connect, stop the guest), and what the return path tells
  the migration (return_path.ReturnPathOwner: PONGs, page requests, recovery replies);
- ``PostcopySwitch`` (switch.py): the switch to postcopy and postcopy's stream to its end;
- ``PostcopyRecovery`` (recovery.py): migrate-pause, the pause after a break, and the
  recovery over a new connection;
- ``OutgoingMigration`` (outgoing.py): control, query-migrate, ``run`` and the precopy
  pass loop with its completion.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import trio

from .. import codec
from ..channel import MigrationChannel, RateLimiter
from ..codec.constants import PING_AFTER_PACKAGE, QEMU_VM_PING_PACKAGED_LOADED
from ..errors import RemoteProtocolError, TransportError
from ..guest.host import GuestProcess
from ..migration import MigrationCapabilities, MigrationParameters, MigrationStatus, SourceStats
from ..postcopy import PageRequest, PageRequestQueue
from ..ram_blocks import RamBlock
from ..status import GUEST_ON_DESTINATION, SOURCE, EventCallback, StatusHolder, StatusMachine
from ..trace import trace
from ..transports import ByteStream, connect, set_channel_timeout
from .postcopy import RequestServed, UrgentSender
from .ram_saver import RamSaver
from .return_path import SourceReturnPath
from .throttle import ConvergenceAids

log = logging.getLogger("trimig.savevm")

RAM_SECTION_ID = 0
GUEST_SECTION_ID = 1
#: A PART section ends after this long, as QEMU's MAX_WAIT, so the loop can resync and check.
ITERATION_SLICE = 0.05
#: Flush the channel when this much is queued.
FLUSH_BYTES = 4 << 20
CLEANUP_TIMEOUT = 10.0


class SourceState(StatusHolder):
    """One outgoing migration's state (see the module's docstring for the layers)."""

    _direction = "outgoing"

    #: The destination's messages on this connection: PONGs, SHUT, page requests (read
    #: in the nursery of run() or recover(), which make a new one for each connection).
    _return_path: SourceReturnPath

    def __init__(
        self,
        guest: GuestProcess,
        blocks: Sequence[RamBlock],
        *,
        capabilities: MigrationCapabilities | None = None,
        parameters: MigrationParameters | None = None,
        connect_options: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.guest = guest
        self.blocks = list(blocks)
        self.capabilities = capabilities or MigrationCapabilities()
        self.parameters = parameters or MigrationParameters()
        #: QEMU's status, moved only along status.SOURCE (an illegal move is our bug).
        self._status = StatusMachine(SOURCE, "source", self._status_changed)
        total = sum(block.size for block in self.blocks)
        self.stats = SourceStats(total=total, remaining=total)
        self._connect_options = connect_options or {}
        self._on_event = on_event
        #: migrate-start-postcopy was asked (QEMU's start_postcopy): switch at the next chance.
        self._postcopy_requested = False
        self._channel: MigrationChannel | None = None
        #: We stopped the guest (set before the stop: a cancelled stop may have stopped it),
        #: so a failure before the switch resumes it. A fact of the guest, not a status.
        self._guest_stopped_by_us = False
        self._limiter = RateLimiter(self.parameters.max_bandwidth)
        self._ram: RamSaver | None = None
        self._requests: PageRequestQueue | None = None
        self._urgent: MigrationChannel | None = None
        self._urgent_sender: UrgentSender | None = None
        #: The work of run(); the return-path reader cancels it when the path fails.
        self._work = trio.CancelScope()
        self._barriers = 0
        #: Set by PONG(4), or by a page request while the destination loads the device
        #: state: the background stream may go.
        self._background_released = trio.Event()
        #: Bytes moved on the channels of earlier connections (postcopy recovery).
        self._bytes_before = 0
        #: migrate-pause asked for the pause (the streams were shut down on purpose).
        self._pause_requested = False
        #: Recoveries that brought postcopy back to postcopy-active.
        self.recoveries = 0
        #: auto-converge and dirty-limit (their task runs in run()'s nursery).
        self._aids = ConvergenceAids(guest, self.capabilities, self.parameters)

    # -- derived state -------------------------------------------------------------------

    @property
    def _uses_return_path(self) -> bool:
        """Whether this migration reads a return path (known once connected). With one the
        destination's SHUT says whether it loaded the stream; without one (exec, file)
        success means the stream was written."""
        return (
            self._channel is not None
            and self._channel.stream.has_return_path
            and (self.capabilities.return_path or self.capabilities.postcopy_ram)
        )

    @property
    def _package_sent(self) -> bool:
        """The package (LISTEN, device state, RUN) is on its way (postcopy-device and
        after): page requests are valid. Read by the return-path thread too."""
        return self.status.value.is_postcopy

    @property
    def _postcopy_running(self) -> bool:
        """PONG(0x42) came back: the destination loaded the package and runs the guest,
        so from now on a failure pauses instead of resuming the guest here."""
        return self.status.value in GUEST_ON_DESTINATION

    # -- steps every phase takes ---------------------------------------------------------

    def _bytes_moved(self) -> int:
        """Bytes moved so far: every channel, and pages written one-sided (QEMU's transferred)."""
        moved = self._bytes_before
        moved += self._channel.bytes_sent if self._channel is not None else 0
        if self._ram is not None:
            moved += self._ram.one_sided_bytes
        if self._urgent_sender is not None:
            moved += self._urgent_sender.bytes_sent
        return moved

    async def _connect(self, uri: str) -> ByteStream:
        """Connect to ``uri`` within x-channel-timeout, the stream bounded by it too."""
        timeout = self.parameters.channel_timeout
        with trio.move_on_after(timeout if timeout is not None else math.inf) as bound:
            stream = await connect(uri, **self._connect_options)
        if bound.cancelled_caught:
            raise TransportError(
                f"connecting to {uri} failed: no answer within {timeout:g} s (x-channel-timeout)"
            )
        set_channel_timeout(stream, timeout)
        return stream

    async def _stop_guest(self, *, save_state: bool = False) -> bytes | None:
        """The switch-over begins (precopy's end, or postcopy's switch): the downtime
        starts, the guest stops (a STOP event), status ``device``. With ``save_state`` the
        guest saves its device state in the same round trip (``stop_and_save``): returned,
        or None from a guest that does not (ask it with ``save_state`` then)."""
        await self._aids.lift(self.stats)  # unthrottled before it is stopped
        self.stats.downtime_start_ns = time.monotonic_ns()
        self._guest_stopped_by_us = True  # before the await: a cancelled stop may have stopped it
        state = None
        try:
            if save_state:
                state = await self.guest.stop_and_save()
            else:
                await self.guest.stop()
        finally:
            if not self.guest.running:  # stopped, even if the save in its reply failed
                if self._on_event:
                    self._on_event("STOP", {})
                self._set_status(MigrationStatus.DEVICE)
        return state

    def _completed(self) -> None:
        self.stats.end_ns = time.monotonic_ns()
        elapsed = max(self.stats.end_ns - self.stats.start_ns, 1) / 1e9
        self.stats.mbps = self.stats.transferred * 8 / elapsed / 1e6
        self._set_status(MigrationStatus.COMPLETED)

    def _raise_if_broken(self) -> None:
        """After the work scope: raise why it was cancelled (the return path failed, or
        migrate-pause shut the channels down)."""
        if not self._work.cancelled_caught:
            return
        if self._return_path.error is not None:
            raise self._return_path.error
        if self._pause_requested:
            raise TransportError("paused by migrate-pause")

    # -- what the return path tells us (return_path.ReturnPathOwner) ---------------------

    def pong_received(self, value: int) -> None:
        if value == QEMU_VM_PING_PACKAGED_LOADED and self._package_sent:
            # The point of no return: the destination runs the guest now (_postcopy_running).
            trace("postcopy_package_loaded")
            self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
        elif value == PING_AFTER_PACKAGE and self._package_sent:
            self.stats.downtime_ns = time.monotonic_ns() - self.stats.downtime_start_ns
            trace("postcopy_running_on_destination", downtime_us=self.stats.downtime_ns // 1000)
            self._background_released.set()

    def request_served(self, served: RequestServed) -> None:
        self.stats.normal += served.data_pages
        self.stats.duplicate += served.zero_pages
        if served.data_pages or served.zero_pages:
            assert self._urgent_sender is not None
            self._urgent_sender.mark_sent(served.request)  # here, in trio: see mark_sent
        self._request_taken(served.request)

    def cancel_work(self) -> None:
        self._work.cancel()

    def page_requested(self, event: codec.ReqPages, *, send_now: bool) -> PageRequest | None:
        request = self._accept_request(event)
        if send_now and self._urgent_sender is not None and self._urgent_sender.urgent is not None:
            return request  # answered by the reader, not queued
        assert self._requests is not None
        self._requests.push(request)  # for the background sender
        return None

    async def send_request(self, request: PageRequest) -> None:
        assert self._urgent_sender is not None
        await self._urgent_sender.send_now(request)

    def serve_in_thread(self, event: codec.ReqPages) -> RequestServed | None:
        """In the return-path thread: answer a page request on the threaded urgent
        channel, or return None to leave it to trio."""
        sender = self._urgent_sender
        if sender is None or not sender.threaded or not self._package_sent:
            return None
        assert self._requests is not None
        request = self._requests.resolve(event.block, event.start, event.length)
        return sender.send_from_thread(request)

    def _accept_request(self, event: codec.ReqPages) -> PageRequest:
        """Validate and count a page request (trio)."""
        if self._requests is None or not self._package_sent:
            raise RemoteProtocolError("page request from the destination before postcopy started")
        request = self._requests.resolve(event.block, event.start, event.length)
        self._request_taken(request)
        return request

    def _request_taken(self, request: PageRequest) -> None:
        assert self._requests is not None
        trace("page_request", block=request.block, start=hex(request.start), length=request.length)
        self.stats.postcopy_requests = self._requests.requests
        if not self._postcopy_running and not self._background_released.is_set():
            # Before PONG(0x42) the guest there has not run: the request comes from its
            # device load, which reads guest memory and would otherwise get it one page
            # at a time. Stream the rest now.
            trace("postcopy_background_released", reason="request during the device load")
            self._background_released.set()
