"""The source's switch to postcopy and postcopy's stream to its end (a layer of
OutgoingMigration; see source_state.py).

At the switch the guest stops, the dirty log is synced a last time, the discards and
the package (LISTEN, device state, RUN) go out; the destination runs the guest and
asks for the pages it misses while the background stream brings the rest. After a
recovery the stream goes on from where it is (``_postcopy_stream``).
"""

from __future__ import annotations

import trio

from .. import codec
from .._trio import open_nursery
from ..channel import MigrationChannel
from ..codec.constants import PING_AFTER_DISCARD, PING_AFTER_PACKAGE
from ..errors import TransportError
from ..migration import MigrationStatus
from ..trace import trace
from .postcopy import UrgentSender, discard_commands, package, send_background
from .ram_saver import DirtyLog, RamSaver
from .return_path import SHUT_TIMEOUT, answer_timeout
from .source_state import (
    FLUSH_BYTES,
    GUEST_SECTION_ID,
    ITERATION_SLICE,
    RAM_SECTION_ID,
    SourceState,
)


class PostcopySwitch(SourceState):
    """The switch to postcopy, and postcopy's stream to the end."""

    async def _run_postcopy(
        self, channel: MigrationChannel, ram: RamSaver, dirty_log: DirtyLog, uri: str
    ) -> None:
        """Switch to postcopy, then stream the rest while serving page requests."""
        assert self._requests is not None
        if self.capabilities.postcopy_preempt:
            self._urgent = MigrationChannel(await self._connect(uri))
        urgent_sender = self._urgent_sender = UrgentSender(ram, self._urgent)
        ram.detach_regions()  # postcopy pages are placed atomically by the destination
        self.stats.precopy_bytes = self._bytes_moved()
        trace("postcopy_switch")
        # The stop's reply carries the device state: no round trip of its own in the pause.
        state = await self._stop_guest(save_state=True)
        trace("postcopy_guest_stopped", state_in_reply=state is not None)
        bytes_before = self._bytes_moved()
        channel.put(codec.encode_switchover_start())
        saved = [] if state is None else [state]
        async with open_nursery() as nursery:
            if state is None:
                # A guest that saves only when asked: it saves while the dirty log is
                # synced and the discards built.
                nursery.start_soon(self._save_state_into, saved)
                await trio.lowlevel.checkpoint()  # the save-state request goes out now
            ram.sync(dirty_log, final=True)  # exact: the guest is stopped
            self.stats.dirty_sync_count += 1
            ram.encoder.reset()
            discards = discard_commands(ram)
            for command in discards:
                channel.put(command)
            trace("postcopy_discard", commands=len(discards), dirty_pages=ram.dirty_pages)
            channel.put(codec.encode_ping(PING_AFTER_DISCARD))
        state = saved[0]
        trace("postcopy_state_saved")
        device = codec.encode_device_section(GUEST_SECTION_ID, "guest", 0, 1, state)
        self._return_path.check()
        # postcopy-device: until PONG(0x42) says the destination loaded the package (and is
        # about to run the guest), a failure still resumes the guest here, as in QEMU 10.2.
        # From this move on page requests are valid (_package_sent).
        self._set_status(MigrationStatus.POSTCOPY_DEVICE)
        channel.put(codec.encode_packaged(package(device)))
        channel.put(codec.encode_ping(PING_AFTER_PACKAGE))
        await channel.flush()
        trace("postcopy_package_sent", device_state=len(state))
        self.stats.downtime_bytes = self._bytes_moved() - bytes_before
        # Serve requests at once (loading the device state on the destination may fault
        # before the guest runs), but hold the background pages until PONG(4), sent once
        # the guest runs there, which ends the downtime (see pong_received): placing
        # them would compete with the destination's switch-over for its CPU. A request
        # before PONG(0x42) ends the hold at once (_request_taken): it comes from a device
        # load that reads guest memory, which only the background stream brings fast.
        async with open_nursery() as nursery:
            nursery.start_soon(self._refresh_holes_once_released, ram, dirty_log)
            await self._postcopy_stream(channel, ram, urgent_sender, hold=self._background_released)
            nursery.cancel_scope.cancel()

    async def _refresh_holes_once_released(self, ram: RamSaver, dirty_log: DirtyLog) -> None:
        """The final sync skipped the stretches where nothing mattered for the switch (it
        called them data); their holes are read once the pause is over."""
        await self._background_released.wait()
        ram.refresh_holes(dirty_log)

    async def _postcopy_stream(
        self,
        channel: MigrationChannel,
        ram: RamSaver,
        urgent_sender: UrgentSender,
        *,
        hold: trio.Event | None,
    ) -> None:
        """The rest of postcopy on ``channel``: the background stream (held until ``hold``
        is set), then the end. After the switch and after each recovery."""
        assert self._requests is not None
        self._limiter.set_rate(self.parameters.max_postcopy_bandwidth)
        postcopy_start = self._bytes_moved()
        async with open_nursery() as nursery:
            if urgent_sender.urgent is not None:
                nursery.start_soon(watch_urgent, urgent_sender.urgent)
            await send_background(
                channel,
                ram,
                self._requests,
                urgent_sender,
                self._limiter,
                section_id=RAM_SECTION_ID,
                flush_bytes=FLUSH_BYTES,
                slice_seconds=ITERATION_SLICE,
                hold=hold,
            )
            if hold is not None:
                # Complete only once the guest runs there (after a recovery it does).
                await self._return_path.pong(PING_AFTER_PACKAGE).wait()
            nursery.cancel_scope.cancel()  # the destination closes the urgent channel next
        # The end (docs/postcopy.md, "The end"): no page is dirty, so every page is on a
        # channel. End the urgent one first (a request read from now on sends nothing: its
        # page is on the main channel), then the main one; the destination reads both to
        # their ends before it sends SHUT.
        await urgent_sender.end()
        channel.put(codec.encode_section_end(RAM_SECTION_ID))
        channel.put(codec.encode_ram_section_close(RAM_SECTION_ID))
        channel.put(codec.encode_eof())
        await channel.flush()
        self.stats.remaining = 0
        # Nothing is left to send, so no send notices a silent destination: the wait for
        # its SHUT is what pauses us, bounded by x-channel-timeout (answer_timeout).
        timeout = self.parameters.channel_timeout
        bound = min(answer_timeout(timeout), max(SHUT_TIMEOUT, timeout or 0))
        await self._return_path.wait_for_shut(bound, why="x-channel-timeout" if timeout else "")
        self.stats.postcopy_bytes += self._bytes_moved() - postcopy_start
        self.stats.transferred = self._bytes_moved()

    async def _save_state_into(self, saved: list[bytes]) -> None:
        saved.append(await self.guest.save_state())


async def watch_urgent(urgent: MigrationChannel) -> None:
    """Raise TransportError once the urgent channel breaks. The destination never sends
    on it, so anything it reads (its end, a reset) means the channel is gone, and with
    it maybe an urgent page the kernel had taken but not delivered: the source must
    pause (a recovery re-sends every page not received), not stream on without it."""
    buffer = memoryview(bytearray(1))
    count = await urgent.stream.receive_into(buffer)
    raise TransportError(
        "the urgent page channel broke: "
        + ("the destination sent on it" if count else "the destination closed it")
    )
