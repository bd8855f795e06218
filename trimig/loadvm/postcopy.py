"""The destination's postcopy: from ADVISE to the end of the stream.

At ADVISE the guest process attaches its blocks (role ``postcopy``), registers them
with its own userfaultfd in MISSING mode and hands the uffd over, while precopy goes
on: the switch then costs the guest no round trip for it (QEMU's destination VM has
its RAM mapped from the start too). A precopy that completes without switching ends
that registration before the guest loads its state (``release_guest``). From LISTEN
three tasks run in the incoming migration's nursery:

* the fault handler, which turns guest faults into page requests on the return path;
* the main listener, which reads the rest of the main stream and places its pages;
* the urgent reader, which places the pages the source sends on its second
  (preempt) connection in answer to requests.

The first and the last are a fault's round trip, so when the connections have file
descriptors they run in OS threads (``trimig.threads``), each woken by the kernel the
moment its fd is ready instead of waiting for the trio loop to come back from placing
background pages; so does the main listener. Each loop is one synchronous step
(``FaultHandler.note_fault``, ``_main_step``, ``_place_urgent``) run by the thread or the
trio driver of ``trimig.loops``. The placer and the fault handler are thread-safe for this.

Every placement is a whole host page, atomically, through the uffd (COPY or ZEROPAGE),
which also wakes the faulting guest thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import numpy.typing as npt
import trio

from .. import codec
from .._trio import open_nursery
from ..channel import READ_CHUNK, MigrationChannel
from ..errors import RemoteProtocolError, TransportError
from ..guest.host import GuestProcess
from ..kernel.probe import probe
from ..kernel.uffd import Userfaultfd
from ..loops import END, End, StreamFeed, decode, decode_in_thread, serve_fd_in_thread
from ..postcopy import (
    MAIN_CHANNEL,
    PREEMPT_CHANNEL,
    FaultHandler,
    GuestRamBlock,
    PagePlacer,
    PageRequest,
    PostcopyStateMachine,
    check_postcopy_support,
)
from ..ram_blocks import TARGET_PAGE_SIZE, RamBlock
from ..threads import StopSignal, ThreadStream, run_in_thread, thread_stream
from ..trace import trace
from ..transports import Listener
from .ram_loader import RamLoader
from .reader import ReturnPathWriter
from .scatter import PageScatter, feed_decoder

log = logging.getLogger("trimig.loadvm.postcopy")

#: The placer's gathering channel for pages placed locally (known zeros), beside the
#: main and preempt channels, so a local placement never splits a host page being gathered.
LOCAL_CHANNEL = 2

#: After the main stream's end, how long the source may take to end the urgent channel
#: (a trimig source ends it just before the main one: this only bounds a broken source).
URGENT_END_TIMEOUT = 10.0

#: Events of the main stream after LISTEN that carry nothing to do.
_STRUCTURAL = (
    codec.SectionPart,
    codec.SectionEnd,
    codec.SectionFooter,
    codec.RamEndOfSection,
)


class PostcopyIncoming:
    """Destination postcopy state for one incoming migration; its tasks run in ``nursery``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        guest: GuestProcess,
        blocks: Sequence[RamBlock],
        ram: RamLoader,
        return_path: ReturnPathWriter,
        listener: Listener | None,
    ) -> None:
        self._nursery = nursery
        self.guest = guest
        self.blocks = list(blocks)
        self.ram = ram
        self._return_path = return_path
        self._listener = listener
        self.state = PostcopyStateMachine()
        self.placer: PagePlacer | None = None
        self.faults: FaultHandler | None = None
        self._uffd: Userfaultfd | None = None
        #: The guest's mapping addresses, once it attached and registered (at ADVISE).
        self._guest_addresses: list[int] | None = None
        self._guest_prepared = trio.Event()
        self._zero_holes: dict[str, np.ndarray] = {}
        self._listening = trio.Event()
        self._running = trio.Event()
        #: Set when the main stream reached its end (all pages placed) or failed.
        self.done = trio.Event()
        self.error: BaseException | None = None
        self._last_requested_block: str | None = None
        self._helpers: trio.Nursery | None = None
        self._helpers_scope = trio.CancelScope()
        self._helpers_done = trio.Event()
        #: The source's urgent (preempt) connection was accepted: finish() reads it to its end.
        self._urgent_accepted = False
        #: Set once the urgent reader reached that end (every urgent page placed).
        self._urgent_ended = trio.Event()
        #: What reads the urgent channel (its byte count is urgent_bytes).
        self._urgent_input: MigrationChannel | StreamFeed | None = None
        #: The urgent channel's decoder, made at LISTEN from the main stream's.
        self._urgent_decoder: codec.RamChannelDecoder | None = None
        #: x-channel-timeout of the main stream's reader (seconds, None: no bound).
        self.channel_timeout: float | None = None
        #: ``finish`` placed every page and closed the uffd: the guest has all its memory
        #: here. A pause after that (the SHUT did not get out) only waits for the end.
        self.finished = False

    # -- commands before LISTEN ---------------------------------------------------------

    async def advise(self, event: codec.PostcopyAdvise) -> None:
        """POSTCOPY_ADVISE: page sizes must match ours and the kernel must support postcopy."""
        self.state.on_advise()
        trace("postcopy_advise", summary=hex(event.page_size_summary))
        if event.target_page_size != TARGET_PAGE_SIZE:
            raise RemoteProtocolError(
                f"target page size {event.target_page_size} differs from ours ({TARGET_PAGE_SIZE})"
            )
        summary = 0
        for block in self.blocks:
            summary |= block.page_size
        if event.page_size_summary != summary:
            raise RemoteProtocolError(
                f"page size summary {event.page_size_summary:#x} differs from ours ({summary:#x}): "
                "the two sides' RAM blocks use different page sizes"
            )
        check_postcopy_support(self.blocks, probe())
        await self._nursery.start(self._supervise_helpers)
        self._start_helper(self._prepare_guest)
        if self._listener is not None:
            self._start_helper(self._accept_urgent_channel, self._listener)

    def discard(self, event: codec.PostcopyRamDiscard) -> None:
        """POSTCOPY_RAM_DISCARD: free pages that went stale after they were sent."""
        self.state.on_discard()
        trace("postcopy_discard", block=event.block, ranges=len(event.ranges))
        for start, length in event.ranges:
            self.ram.discard(event.block, start, length)

    # -- LISTEN and RUN -----------------------------------------------------------------

    async def listen(self, channel: MigrationChannel, decoder: codec.StreamDecoder) -> None:
        """POSTCOPY_LISTEN: start the postcopy tasks on the guest's userfaultfd (taken at
        ADVISE, ``_prepare_guest``). From here on the main listener owns ``channel`` and
        ``decoder``."""
        self.state.on_listen()
        trace("postcopy_listen")
        await self._guest_prepared.wait()  # at once, but for a precopy of a few ms
        assert self._uffd is not None and self._guest_addresses is not None
        addresses = self._guest_addresses
        self._zero_holes = self.ram.take_zero_holes()
        guest_blocks = [
            GuestRamBlock(block.name, address, block.size, block.page_size, block.fd)
            for block, address in zip(self.blocks, addresses, strict=True)
        ]
        received = self.ram.received
        self.faults = FaultHandler(self._uffd, guest_blocks, received, self._request_page)
        self.placer = PagePlacer(
            self._uffd,
            guest_blocks,
            received,
            channels=3,
            on_placed=self.faults.pages_placed,
            on_page_placed=self.faults.page_placed,
        )
        await self._serve(channel, decoder)
        self._listening.set()
        trace("postcopy_listening")

    async def _serve(self, channel: MigrationChannel, decoder: codec.StreamDecoder) -> None:
        """Start the fault handler (among the helpers) and the main listener."""
        assert self._helpers is not None and self.faults is not None
        if self._return_path.threadsafe:
            trace("postcopy_thread", loop="fault handler")
            await self._helpers.start(
                functools.partial(run_in_thread, self._serve_faults, urgent=True)
            )
        else:
            await self._helpers.start(self.faults.run)
        # Made here, before the listener owns the main decoder: same blocks (MEM_SIZE).
        self._urgent_decoder = decoder.ram_channel_decoder()
        self._nursery.start_soon(self._listen_main, channel, decoder)

    # -- pause and recovery -------------------------------------------------------------

    def paused(self) -> None:
        """The channels broke after RUN and every postcopy task has ended: drop the host
        pages half gathered on the main and urgent channels (never marked received, they
        are sent again after a recovery). The uffd, the received bitmap and the requests
        still waiting stay: the guest blocks on its missing pages until then."""
        if self.placer is not None:
            self.placer.reset_channel(MAIN_CHANNEL)
            self.placer.reset_channel(PREEMPT_CHANNEL)

    async def resume(
        self,
        nursery: trio.Nursery,
        channel: MigrationChannel,
        decoder: codec.StreamDecoder,
        return_path: ReturnPathWriter,
        listener: Listener | None,
    ) -> None:
        """Postcopy recovery, on POSTCOPY_RESUME: RESUME_ACK(1), every request still
        waiting sent again (the source lost its queue), then the postcopy tasks start
        again in ``nursery`` on the new channels (the urgent one accepted on ``listener``)."""
        assert self.faults is not None
        self._nursery = nursery
        self._return_path = return_path
        self._listener = listener
        self.done = trio.Event()
        self.error = None
        self._helpers_scope = trio.CancelScope()
        self._helpers_done = trio.Event()
        self._urgent_accepted = False
        self._urgent_ended = trio.Event()
        await return_path.send(codec.encode_rp_resume_ack())
        received = self.ram.received
        waiting = [
            request
            for request in self.faults.outstanding()
            if not received.is_received(request.block, request.start, request.length)
        ]
        for request in waiting:  # each names its block: the source forgot the last one
            await return_path.send(
                codec.encode_rp_req_pages(request.start, request.length, request.block)
            )
        self._last_requested_block = None
        trace("postcopy_resume", requests_sent_again=len(waiting))
        await nursery.start(self._supervise_helpers)
        if listener is not None:
            self._start_helper(self._accept_urgent_channel, listener)
        await self._serve(channel, decoder)

    async def read_the_end(self, channel: MigrationChannel, decoder: codec.StreamDecoder) -> None:
        """Recovery after ``finish`` (the pause came while the SHUT went out): the source,
        told that every page is here, sends only the end of the stream; read up to it."""

        def step(event: object) -> End | None:
            if isinstance(event, codec.EndOfStream):
                return END
            if not isinstance(event, _STRUCTURAL):
                raise RemoteProtocolError(
                    f"unexpected {type(event).__name__} after every page was placed"
                )
            return None

        await decode(decoder, channel, step)

    async def drain_urgent(self, listener: Listener) -> None:
        """With ``read_the_end``: take the source's new urgent connection and read it to
        its end (it carries no page: the source has none left to send)."""
        stream = await listener.accept()
        try:
            buffer = memoryview(bytearray(1 << 16))
            with contextlib.suppress(TransportError):  # only the main stream's end counts
                while await stream.receive_into(buffer):
                    pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await stream.aclose()

    async def _prepare_guest(self) -> None:
        """At ADVISE (a helper): attach the guest's blocks for postcopy, take its MISSING
        userfaultfd and tell it postcopy-start, so that LISTEN and RUN find it ready. The
        guest touches no memory until it runs; precopy pages go on arriving in the memfds
        meanwhile (and it runs here only after RUN, so it gives no RAM back early)."""
        await self.guest.attach(self.blocks, "postcopy")
        trace("postcopy_guest_attached")
        uffd, addresses = await self.guest.register_missing()
        self._uffd, self._guest_addresses = uffd, addresses
        trace("postcopy_guest_registered")
        await self.guest.notify("postcopy-start")
        self._guest_prepared.set()

    async def release_guest(self) -> None:
        """Precopy completed after ADVISE without a switch: end the registration (close
        our uffd: the guest holds no copy) and tell the guest. Its memory is complete; it
        stays attached (role ``postcopy``) and loads its state next."""
        await self._guest_prepared.wait()
        self._helpers_scope.cancel()
        await self._helpers_done.wait()
        self.close()
        await self.guest.unregister_missing()
        await self.guest.notify("postcopy-end")

    async def run_guest(self) -> None:
        """POSTCOPY_RUN: the guest runs here from now on, faulting in what is missing."""
        self.state.on_run()
        trace("postcopy_run")
        await self.guest.cont()
        self._running.set()

    async def finish(self) -> None:
        """After the main stream's end (docs/postcopy.md, "The end"): read the urgent
        channel to its end, stop asking for pages, check that every requested page came,
        unregister, tell the guest. The caller then sends SHUT: after every request.

        The source ends the urgent channel before the main one and answers a request read
        after that with nothing (its page is on the main channel), so once both ends are
        read every page is placed, and no urgent page can still be on its way when the
        urgent connection closes."""
        if self._urgent_accepted:
            with trio.move_on_after(URGENT_END_TIMEOUT) as bound:
                await self._urgent_ended.wait()
            if bound.cancelled_caught:
                raise TransportError(
                    "the source did not end the urgent page channel within "
                    f"{URGENT_END_TIMEOUT:g} s of the main stream's end"
                )
        self._helpers_scope.cancel()  # the fault handler: no request goes out from here on
        await self._helpers_done.wait()
        assert self.faults is not None
        # Every requested page must be here by now. (The requests' own record may lag: a
        # placement that raced the fault's note may leave its request open; the received
        # bitmap is what says whether the page is there.)
        received = self.ram.received
        missing = [
            request
            for request in self.faults.outstanding()
            if not received.is_received(request.block, request.start, request.length)
        ]
        if missing:
            # Closing the uffd now would let the guest read holes where its pages belong.
            # (Still RUNNING: a recovery, whose bitmaps say what is missing, goes on.)
            raise RemoteProtocolError(
                f"the source ended postcopy without {len(missing)} requested page(s), the "
                f"first {missing[0].block}+{missing[0].start:#x}"
            )
        self.state.on_end()
        trace("postcopy_end", **self.statistics())
        self.close()  # closing our uffd ends the registration (the guest closed its copy)
        self.finished = True
        await self.guest.unregister_missing()
        await self.guest.notify("postcopy-end")

    def close(self) -> None:
        """Close our copy of the uffd (safe to repeat). The helper tasks must be over:
        call it after ``finish`` or once the owning nursery has exited."""
        self._helpers_scope.cancel()
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None

    @property
    def urgent_bytes(self) -> int:
        """Bytes read on the urgent channel so far."""
        return self._urgent_input.bytes_received if self._urgent_input is not None else 0

    def pages_placed(self) -> int:
        """Host pages placed so far (grows while the guest's missing memory arrives)."""
        return self.placer.stats.host_pages_placed if self.placer is not None else 0

    def statistics(self) -> dict[str, object]:
        """postcopy-requests, latency, latency distribution and blocktime (query-migrate
        names), and the bytes read on the urgent channel."""
        if self.faults is None:
            return {}
        return {**self.faults.stats().as_qmp(), "x-postcopy-preempt-bytes": self.urgent_bytes}

    # -- tasks --------------------------------------------------------------------------

    async def _supervise_helpers(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the fault handler and the urgent reader, so ``finish`` can stop and await them."""
        try:
            with self._helpers_scope:
                async with open_nursery() as nursery:
                    self._helpers = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._helpers = None
            self._helpers_done.set()

    def _start_helper(self, function: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._helpers is not None
        self._helpers.start_soon(function, *args)

    # The fault handler: its step is FaultHandler.note_fault; FaultHandler.run (trio)
    # or _serve_faults (the thread) drive it and hand each request to one of these.

    async def _request_page(self, block: str, offset: int, length: int) -> None:
        """Trio: ask the source for a faulted host page, or place a known zero."""
        request = PageRequest(block, offset, length)
        message = self._page_request(request)
        if message is not None:
            try:
                await self._return_path.send(message)
            except TransportError as exc:
                _request_not_sent(request, exc)

    def _request_page_from_thread(self, request: PageRequest) -> None:
        """The fault thread: ``_request_page``, written from the thread."""
        message = self._page_request(request)
        if message is not None:
            try:
                self._return_path.send_from_thread(message)
            except TransportError as exc:
                _request_not_sent(request, exc)

    def _serve_faults(self, stop: StopSignal) -> None:
        """The fault thread: guest faults to page requests, until ``stop``."""
        assert self._uffd is not None and self.faults is not None
        uffd = self._uffd
        serve_fd_in_thread(
            uffd.fileno(),
            uffd.read_faults,
            stop,
            self.faults.note_fault,
            self._request_page_from_thread,
        )

    def _page_request(self, request: PageRequest) -> bytes | None:
        """The REQ_PAGES(_ID) message for a faulted host page; or None after placing it
        here, if it is a known zero page. Called by the fault path only (one at a time)."""
        block, offset, length = request.block, request.start, request.length
        holes = self._zero_holes.get(block)
        if holes is not None and holes[offset // TARGET_PAGE_SIZE]:
            assert self.placer is not None
            holes[offset // TARGET_PAGE_SIZE : (offset + length) // TARGET_PAGE_SIZE] = False
            offsets = np.arange(offset, offset + length, TARGET_PAGE_SIZE, dtype=np.uint64)
            self.placer.place_zero(block, offsets, channel=LOCAL_CHANNEL)
            return None
        named = block if block != self._last_requested_block else None
        self._last_requested_block = block
        return codec.encode_rp_req_pages(offset, length, named)

    async def _listen_main(self, channel: MigrationChannel, decoder: codec.StreamDecoder) -> None:
        """Read the rest of the main stream, placing pages, until its end (in a thread when
        the stream has a thread stream)."""
        try:
            stream = thread_stream(channel.stream)
            if stream is not None and not channel.buffered:
                token = trio.lowlevel.current_trio_token()
                trace("postcopy_thread", loop="main listener", stream=type(stream).__name__)
                await run_in_thread(
                    functools.partial(self._listen_in_thread, stream, decoder, token)
                )
            else:
                await decode(decoder, channel, self._main_step, self._answer_ping)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def _listen_in_thread(
        self,
        stream: ThreadStream,
        decoder: codec.StreamDecoder,
        token: trio.lowlevel.TrioToken,
        stop: StopSignal,
    ) -> None:
        """The main listener's thread: decode the main stream until its end, taking runs of
        page records off it with a PageScatter so that they are placed without a copy."""
        scatter = PageScatter(timeout=self.channel_timeout)

        def feed(_: object) -> bool:
            return feed_decoder(decoder, stream, scatter, stop, place=self._place_main)

        def answer_ping(value: int) -> None:
            token.run_sync_soon(self._nursery.start_soon, self._pong_once_running, value)

        decode_in_thread(decoder, feed, self._main_step, answer_ping)

    def _main_step(self, event: object) -> int | End | None:
        """Act on one event of the main stream after LISTEN: place its pages; the value
        of a PING to answer; END at the end of the stream."""
        assert self.placer is not None
        if isinstance(event, codec.RamPages):
            self.placer.place(event.block, event.offsets, event.pages, channel=MAIN_CHANNEL)
        elif isinstance(event, codec.RamZeroPages):
            self.placer.place_zero(event.block, event.offsets, channel=MAIN_CHANNEL)
        elif isinstance(event, codec.EndOfStream):
            return END
        elif isinstance(event, codec.Ping):
            return event.value
        elif not isinstance(event, _STRUCTURAL):
            raise RemoteProtocolError(
                f"unexpected {type(event).__name__} in the stream during postcopy"
            )
        return None

    def _place_main(
        self, block: str, offsets: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint8]
    ) -> None:
        assert self.placer is not None
        self.placer.place(block, offsets, pages, channel=MAIN_CHANNEL)

    async def _answer_ping(self, value: int) -> None:
        """A PONG acknowledges everything before its PING, the package included: answer
        once the guest runs, without holding up the pages behind it."""
        self._nursery.start_soon(self._pong_once_running, value)

    async def _pong_once_running(self, value: int) -> None:
        await self._running.wait()
        try:
            await self._return_path.send(codec.encode_rp_pong(value))
        except TransportError as exc:  # the listener reports the broken stream
            log.warning("PONG(%d) not sent: %s", value, exc)

    async def _accept_urgent_channel(self, listener: Listener) -> None:
        """Take the source's second connection as the urgent (preempt) page channel and
        place its pages up to its end; the connection closes only then (or on failure)."""
        stream = await listener.accept()
        self._urgent_accepted = True
        try:
            await self._listening.wait()
            decoder = self._urgent_decoder
            assert decoder is not None
            in_thread = thread_stream(stream)
            if in_thread is None:
                channel = self._urgent_input = MigrationChannel(stream)
                await decode(decoder, channel, self._place_urgent)
                ended = True
            else:
                trace("postcopy_thread", loop="urgent reader", stream=type(in_thread).__name__)
                ended = await run_in_thread(
                    functools.partial(self._read_urgent_in_thread, in_thread, decoder),
                    urgent=True,
                )
            if ended:
                self._urgent_ended.set()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await stream.aclose()

    def _read_urgent_in_thread(
        self, stream: ThreadStream, decoder: codec.RamChannelDecoder, stop: StopSignal
    ) -> bool:
        """The urgent reader's thread: read and place urgent pages until the channel's end
        (True) or ``stop`` (False)."""
        feed = self._urgent_input = StreamFeed(
            stream, stop, what="the urgent page channel", chunk=READ_CHUNK
        )
        return decode_in_thread(decoder, feed, self._place_urgent)

    def _place_urgent(self, event: object) -> End | None:
        """Place one event of the urgent channel; END at its end (EOS or closed)."""
        assert self.placer is not None
        if isinstance(event, codec.RamPages):
            if len(event.offsets) == 1:  # the urgent page
                offset = int(event.offsets[0])
                self.placer.place_page(event.block, offset, event.pages[0], channel=PREEMPT_CHANNEL)
            else:
                self.placer.place(event.block, event.offsets, event.pages, channel=PREEMPT_CHANNEL)
        elif isinstance(event, codec.RamZeroPages):
            self.placer.place_zero(event.block, event.offsets, channel=PREEMPT_CHANNEL)
        else:
            return END
        return None


def _request_not_sent(request: PageRequest, exc: TransportError) -> None:
    log.warning("page request for %s+%#x not sent: %s", request.block, request.start, exc)
