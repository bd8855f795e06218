"""The source side of a migration: one OutgoingMigration object per migration.

``await OutgoingMigration(...).run(uri)`` runs the whole migration under the
caller's task. Its return-path reader lives in a nursery the object owns. The
guest is left as it was if the migration fails or is cancelled before the
switch to the destination: running if it ran, with dirty tracking undone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import trio

from .. import codec
from .._trio import open_nursery, sole_error
from ..channel import MigrationChannel, RateLimiter
from ..codec.constants import (
    PING_AFTER_DISCARD,
    PING_AFTER_PACKAGE,
    QEMU_VM_PING_PACKAGED_LOADED,
)
from ..errors import (
    ConfigError,
    MigrationFailed,
    MigrationPaused,
    RemoteProtocolError,
    TransportError,
    forget_locals,
)
from ..guest.host import GuestProcess
from ..migration import MigrationCapabilities, MigrationParameters, MigrationStatus, SourceStats
from ..postcopy import PageRequest, PageRequestQueue, dump_bitmap
from ..ram_blocks import RamBlock
from ..status import GUEST_ON_DESTINATION, SOURCE, EventCallback, StatusHolder, StatusMachine
from ..trace import trace
from ..transports import ByteStream, FileStream, connect, set_channel_timeout, shutdown_stream
from . import convergence
from .mapped_ram import MappedRamWriter, check_transport, configuration
from .postcopy import RequestServed, UrgentSender, discard_commands, package, send_background
from .ram_saver import DirtyLog, RamSaver, send_part
from .recovery import ResumeHandshake
from .return_path import SHUT_TIMEOUT, SourceReturnPath
from .throttle import ConvergenceAids

log = logging.getLogger("trimig.savevm")

RAM_SECTION_ID = 0
GUEST_SECTION_ID = 1
#: A PART section ends after this long, as QEMU's MAX_WAIT, so the loop can resync and check.
ITERATION_SLICE = 0.05
#: Flush the channel when this much is queued.
FLUSH_BYTES = 4 << 20
#: PING values of the barriers between precopy passes with one-sided writes (+ pass).
PASS_BARRIER_PING = 0x10000
CLEANUP_TIMEOUT = 10.0


class OutgoingMigration(StatusHolder):
    """Moves one running guest to a destination. Create one per migration."""

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
        #: The destination's messages: PONGs, SHUT, page requests (read in run()'s nursery).
        self._return_path = SourceReturnPath(self)
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
        #: The handshake of the recovery attempt under way.
        self._handshake: ResumeHandshake | None = None
        #: Recoveries that brought postcopy back to postcopy-active.
        self.recoveries = 0
        #: auto-converge and dirty-limit (their task runs in run()'s nursery).
        self._aids = ConvergenceAids(guest, self.capabilities, self.parameters)

    # -- control -----------------------------------------------------------------------

    def start_postcopy(self) -> None:
        """Ask for the switch to postcopy at the next opportunity (migrate-start-postcopy)."""
        if not self.capabilities.postcopy_ram:
            raise ConfigError("postcopy is not enabled: set the postcopy-ram capability first")
        if self.status.value is MigrationStatus.NONE:
            raise ConfigError("no migration is running")
        self._postcopy_requested = True

    def set_max_bandwidth(self, bytes_per_second: int) -> None:
        self.parameters.max_bandwidth = bytes_per_second
        self._limiter.set_rate(bytes_per_second)

    def pause(self) -> None:
        """migrate-pause: break the channels of a running postcopy on purpose (QEMU shuts
        the socket down); the migration then pauses, ready for ``recover``."""
        status = self.status.value
        if status not in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER):
            raise ConfigError(
                "migrate-pause needs postcopy-active or postcopy-recover; the outgoing "
                f"migration is {status.value}"
            )
        self._pause_requested = True
        for channel in (self._channel, self._urgent):
            if channel is not None:
                shutdown_stream(channel.stream)

    def begin_recovery(self) -> None:
        """The synchronous start of ``recover`` (migrate resume=true): postcopy-paused ->
        postcopy-recover-setup, or ConfigError naming the state the migration is in."""
        status = self.status.value
        if status is not MigrationStatus.POSTCOPY_PAUSED:
            raise ConfigError(
                "migrate with resume=true needs a paused postcopy (postcopy-paused); the "
                f"outgoing migration is {status.value}"
            )
        self._set_status(MigrationStatus.POSTCOPY_RECOVER_SETUP)

    def query(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo for this migration."""
        self.stats.transferred = self._bytes_moved()
        if self._ram is not None and self.status.value.is_running:
            self.stats.remaining = self._ram.remaining_bytes
        info = self.stats.query(self.status.value)
        if self.recoveries:
            info["x-postcopy-recoveries"] = self.recoveries
        return info

    def _bytes_moved(self) -> int:
        """Bytes moved so far: every channel, and pages written one-sided (QEMU's transferred)."""
        moved = self._bytes_before
        moved += self._channel.bytes_sent if self._channel is not None else 0
        if self._ram is not None:
            moved += self._ram.one_sided_bytes
        if self._urgent_sender is not None:
            moved += self._urgent_sender.bytes_sent
        return moved

    def dump_bitmaps(self) -> str:
        """Text dump of each block's dirty and sent bitmaps (QEMU's ram_debug_dump_bitmap)."""
        if self._ram is None:
            return ""
        parts = []
        for block in self.blocks:
            parts.append(f"{block.name} dirty:\n{dump_bitmap(self._ram.dirty[block.name])}")
            parts.append(f"{block.name} sent:\n{dump_bitmap(self._ram.sent[block.name])}")
        return "".join(parts)

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

    # -- the migration -------------------------------------------------------------------

    async def run(self, uri: str) -> None:
        """Migrate the guest to ``uri``. Returns once completed.

        Raises MigrationFailed (the guest runs on here), MigrationPaused (postcopy broke
        after the switch) or Cancelled."""
        if self.status.value is not MigrationStatus.NONE:
            raise ConfigError("an OutgoingMigration runs once; create a new one")
        self._set_status(MigrationStatus.SETUP)
        self.stats.start_ns = time.monotonic_ns()
        dirty_log: DirtyLog | None = None
        try:
            stream = await self._connect(uri)
            try:
                check_transport(
                    stream,
                    mapped_ram=self.capabilities.mapped_ram,
                    postcopy=self.capabilities.postcopy_ram,
                    uri=uri,
                )
                if self.capabilities.postcopy_ram and not stream.has_return_path:
                    raise ConfigError(
                        f"the transport of {uri!r} has no return path, which postcopy-ram needs"
                    )
                channel = self._channel = MigrationChannel(stream)
                uffd, addresses = await self.guest.track_dirty()
                dirty_log = DirtyLog(self.guest.pid, self.blocks, addresses, uffd)
                async with open_nursery() as nursery:
                    if self._uses_return_path:
                        await nursery.start(self._return_path.read, channel)
                    await self._aids.start(nursery)  # lifted when the nursery ends
                    with self._work:
                        try:
                            await self._migrate(channel, dirty_log, nursery, uri)
                        except BaseException as exc:  # also the Cancelled this scope catches
                            forget_locals(exc)
                            await self._return_path.await_verdict(
                                exc, expected=self._uses_return_path and not self._postcopy_running
                            )
                            raise
                    self._raise_if_broken()
                    nursery.cancel_scope.cancel()
            finally:
                if self._ram is not None:
                    self._ram.detach_regions()  # drop our views of the destination's memory
                    self._ram.close()
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    if self._urgent is not None:
                        await self._urgent.aclose()
                    if self._channel is not None:
                        await self._channel.aclose()  # drops unsent page views, closes the stream
                    else:
                        await stream.aclose()
        except BaseException as exc:
            forget_locals(exc)
            if self._postcopy_running:
                # The guest now runs on the destination: never resume it here.
                if dirty_log is not None:
                    dirty_log.close()
                self._pause(exc, uri)
            await self._recover_source(dirty_log)
            if isinstance(sole_error(exc), trio.Cancelled):
                self._set_status(MigrationStatus.CANCELLED)
                raise
            self.stats.error_desc = self._return_path.failure_reason(exc)
            self._set_status(MigrationStatus.FAILED)
            if isinstance(exc, Exception):
                reason = self.stats.error_desc
                raise MigrationFailed(f"migration to {uri} failed: {reason}") from exc
            raise
        else:
            self.stats.end_ns = time.monotonic_ns()
            elapsed = max(self.stats.end_ns - self.stats.start_ns, 1) / 1e9
            self.stats.mbps = self.stats.transferred * 8 / elapsed / 1e6
            # Completed once the destination said so; the dirty log stops after (as QEMU's
            # cleanup stops it after COMPLETED): unregistering 1 GiB takes the guest tens of
            # milliseconds, which are no part of the migration. run() still returns after it.
            self._set_status(MigrationStatus.COMPLETED)
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await self.guest.untrack_dirty()
            if dirty_log is not None:
                dirty_log.close()

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

    def _pause(self, exc: BaseException, uri: str) -> None:
        """After the switch: postcopy-paused (the guest lives in two halves) and raise
        MigrationPaused, or re-raise a cancellation."""
        if self._pause_requested:
            reason = "paused by migrate-pause"
        else:
            reason = str(sole_error(exc)) or type(sole_error(exc)).__name__
        self._pause_requested = False
        self.stats.error_desc = reason
        self._urgent_sender = None  # its channel is gone: the return-path thread must not use it
        self._set_status(MigrationStatus.POSTCOPY_PAUSED)
        log.warning("postcopy to %s paused: %s", uri, reason)
        if isinstance(exc, Exception):
            raise MigrationPaused(f"postcopy to {uri} broke after the switch: {reason}") from exc
        raise exc

    # -- postcopy recovery ---------------------------------------------------------------

    async def recover(self, uri: str) -> None:
        """Resume a paused postcopy over a new connection to ``uri`` (QEMU's migrate with
        resume=true). Returns once the migration completed; raises MigrationPaused (the
        migration back in postcopy-paused, ready for another attempt) if the connection or
        the handshake fails or the link breaks again.

        The handshake (docs/postcopy.md, "Recovery"): RECV_BITMAP for each block, the
        destination's received bitmaps, every page not received dirty again; the urgent
        channel reconnected; POSTCOPY_RESUME, RESUME_ACK(1); then the background stream
        goes on where it is and the destination re-sends the requests it still waits for.
        """
        if self.status.value is MigrationStatus.POSTCOPY_PAUSED:
            self.begin_recovery()
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER_SETUP or self._ram is None:
            raise ConfigError(f"no paused postcopy to recover ({self.status.value.value})")
        for old in (self._channel, self._urgent):
            if old is not None:
                self._bytes_before += old.bytes_sent
        self._channel = self._urgent = None
        try:
            stream = await self._connect(uri)
            try:
                self._channel = channel = MigrationChannel(stream)
                self._set_status(MigrationStatus.POSTCOPY_RECOVER)
                self._return_path = SourceReturnPath(self)
                self._work = trio.CancelScope()
                # The destination may take its x-channel-timeout to notice the break first.
                channel_timeout = self.parameters.channel_timeout
                timeout = 2 * channel_timeout + 5 if channel_timeout else SHUT_TIMEOUT
                self._handshake = ResumeHandshake(self.blocks, timeout=timeout)
                async with open_nursery() as nursery:
                    await nursery.start(self._return_path.read, channel)
                    with self._work:
                        await self._resume_postcopy(channel, self._ram, uri)
                    self._raise_if_broken()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    if self._urgent is not None:
                        await self._urgent.aclose()
                    if self._channel is not None:
                        await self._channel.aclose()
                    else:
                        await stream.aclose()
        except BaseException as exc:
            forget_locals(exc)
            self._pause(exc, uri)
        self._completed()

    async def _resume_postcopy(self, channel: MigrationChannel, ram: RamSaver, uri: str) -> None:
        assert self._handshake is not None
        await self._handshake.sync_bitmaps(channel, ram)
        if self.capabilities.postcopy_preempt:
            self._urgent = MigrationChannel(await self._connect(uri))
        self._urgent_sender = UrgentSender(ram, self._urgent)
        await self._handshake.resume(channel)
        self.stats.error_desc = ""  # recovered: the pause's reason is history
        self.recoveries += 1
        self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
        log.info("postcopy to %s resumed: %d pages to send", uri, ram.dirty_pages)
        await self._postcopy_stream(channel, ram, self._urgent_sender, hold=None)

    def received_bitmap(self, event: codec.RpRecvBitmap) -> None:
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER or not self._handshake:
            raise RemoteProtocolError("a received bitmap outside postcopy recovery")
        self._handshake.received_bitmap(event)

    def resume_acked(self, value: int) -> None:
        if self.status.value is not MigrationStatus.POSTCOPY_RECOVER or not self._handshake:
            raise RemoteProtocolError("RESUME_ACK outside postcopy recovery")
        self._handshake.resume_acked(value)

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

    async def _recover_source(self, dirty_log: DirtyLog | None) -> None:
        """After a failure before the switch: the guest runs on, untracked, as before."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await self._aids.lift(self.stats)  # the guest runs at full speed again
                if self._guest_stopped_by_us:
                    await self.guest.cont()
                    self._guest_stopped_by_us = False
                await self.guest.untrack_dirty()
            except Exception:
                log.exception("could not restore the source guest")
        if dirty_log is not None:
            dirty_log.close()

    async def _migrate(
        self, channel: MigrationChannel, dirty_log: DirtyLog, nursery: trio.Nursery, uri: str
    ) -> None:
        ram = self._ram = RamSaver(self.blocks, self.stats)
        self._requests = PageRequestQueue(self.blocks)
        ram.sync(dirty_log)  # start the log afresh (every page is dirty anyway); hole map
        channel.put(codec.encode_file_header())
        channel.put(configuration(mapped_ram=self.capabilities.mapped_ram))
        if self._uses_return_path:
            channel.put(codec.encode_open_return_path())
            channel.put(codec.encode_ping(1))
        if self.capabilities.postcopy_ram:
            summary = 0
            for block in self.blocks:
                summary |= block.page_size
            channel.put(codec.encode_postcopy_advise(summary, codec.TARGET_PAGE_SIZE))
        channel.put(codec.encode_section_start(RAM_SECTION_ID, "ram", 0, 4))
        if self.capabilities.mapped_ram:
            assert isinstance(channel.stream, FileStream)  # check_transport
            ram.file_pages = MappedRamWriter(channel.stream, self.blocks)
            await ram.file_pages.put_mem_size(channel)
        else:
            channel.put(
                codec.encode_mem_size(
                    [codec.RamBlockInfo(b.name, b.size, b.page_size) for b in self.blocks],
                    postcopy=self.capabilities.postcopy_ram,
                )
            )
        channel.put(codec.encode_ram_section_close(RAM_SECTION_ID))
        await channel.flush()
        if channel.stream.regions is not None and self._uses_return_path:
            # RDMA-shaped transport: the destination registers its blocks on MEM_SIZE.
            # One-sided writes land at once, records when the destination reads them, so
            # each pass ends with a barrier on the return path (_pass_barrier); without a
            # return path the pages go in-band.
            await ram.attach_regions(channel.stream.regions)
        self.stats.setup_ns = time.monotonic_ns() - self.stats.start_ns
        self._set_status(MigrationStatus.ACTIVE)

        pass_started = time.monotonic()
        pass_bytes_start = self._bytes_moved()
        while True:
            self._return_path.check()
            if self._postcopy_requested:
                # migrate-start-postcopy takes effect before the next slice, as in QEMU.
                await self._run_postcopy(channel, ram, dirty_log, uri)
                return
            finished_pass = await send_part(
                channel,
                ram,
                self._limiter,
                section_id=RAM_SECTION_ID,
                flush_bytes=FLUSH_BYTES,
                # A file has no return path to check nor postcopy to switch to: with
                # mapped-ram (no records, PART is EOS only) one PART per pass will do.
                slice_seconds=math.inf if ram.file_pages is not None else ITERATION_SLICE,
            )
            if not finished_pass:
                continue
            if ram.writes_one_sided:
                await self._pass_barrier(channel)
            # A whole pass is out: sync the dirty log and decide.
            elapsed = max(time.monotonic() - pass_started, 1e-6)
            sent = self._bytes_moved() - pass_bytes_start
            self.stats.bandwidth = sent / elapsed
            newly = ram.sync(dirty_log)
            self.stats.dirty_sync_count += 1
            trace(
                "dirty_sync",
                count=self.stats.dirty_sync_count,
                newly_dirty=newly,
                remaining=ram.remaining_bytes,
                bandwidth=int(self.stats.bandwidth),
            )
            self.stats.dirty_pages_rate = int(newly / elapsed)
            self.stats.remaining = ram.remaining_bytes
            self.stats.transferred = self.stats.precopy_bytes = self._bytes_moved()
            self.stats.mbps = self.stats.bandwidth * 8 / 1e6
            if self._on_event:
                self._on_event("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})
            await self._aids.after_pass(
                dirtied=newly * codec.TARGET_PAGE_SIZE, sent=sent, elapsed=elapsed, stats=self.stats
            )
            decision = convergence.decide(
                remaining=ram.remaining_bytes,
                bandwidth=self.parameters.avail_switchover_bandwidth or self.stats.bandwidth,
                downtime_limit_ms=self.parameters.downtime_limit,
                passes=self.stats.dirty_sync_count,
                non_converging_passes=self.stats.non_converging_passes,
                postcopy=convergence.PostcopySettings(
                    enabled=self.capabilities.postcopy_ram,
                    requested=self._postcopy_requested,
                    after_passes=self.parameters.x_postcopy_after_passes,
                    auto_passes=self.parameters.x_postcopy_auto_passes,
                ),
            )
            self.stats.expected_downtime_ms = decision.expected_downtime_ms
            if decision.converging is not None:
                self.stats.converging = decision.converging
                self.stats.non_converging_passes = decision.non_converging_passes
            self.stats.not_converging_reason = convergence.not_converging_reason(
                dirty_rate=newly * codec.TARGET_PAGE_SIZE / elapsed,
                bandwidth=self.stats.bandwidth,
                remaining=ram.remaining_bytes,
                threshold=decision.threshold,
                expected_downtime_ms=decision.expected_downtime_ms,
                downtime_limit_ms=self.parameters.downtime_limit,
                aids=self._aids.describe(),
            )
            if decision.action is convergence.Action.COMPLETE:
                break
            if decision.action is convergence.Action.POSTCOPY:
                if decision.reason is convergence.Reason.NOT_CONVERGING_AUTO_POSTCOPY:
                    trace("postcopy_auto_switch", passes=self.stats.non_converging_passes)
                else:
                    # Asked for postcopy: switch now, even if precopy could finish.
                    self._postcopy_requested = True
                await self._run_postcopy(channel, ram, dirty_log, uri)
                return
            log.info(
                "pass %d: %d bytes remain, threshold %d: not converging yet",
                self.stats.dirty_sync_count,
                ram.remaining_bytes,
                decision.threshold,
            )
            pass_started = time.monotonic()
            pass_bytes_start = self._bytes_moved()
        await self._complete_precopy(channel, ram, dirty_log)

    async def _stop_guest(self) -> None:
        """The switch-over begins (precopy's end, or postcopy's switch): the downtime
        starts, the guest stops (a STOP event), status ``device``."""
        await self._aids.lift(self.stats)  # unthrottled before it is stopped
        self.stats.downtime_start_ns = time.monotonic_ns()
        self._guest_stopped_by_us = True  # before the await: a cancelled stop may have stopped it
        await self.guest.stop()
        if self._on_event:
            self._on_event("STOP", {})
        self._set_status(MigrationStatus.DEVICE)

    async def _complete_precopy(
        self, channel: MigrationChannel, ram: RamSaver, dirty_log: DirtyLog
    ) -> None:
        """Stop the guest, send what is left and the device state, and hand over."""
        await self._stop_guest()
        ram.sync(dirty_log, final=True)  # exact: the guest is stopped
        self.stats.dirty_sync_count += 1
        bytes_before = self._bytes_moved()
        channel.put(codec.encode_switchover_start())
        channel.put(codec.encode_section_end(RAM_SECTION_ID))
        while (window := ram.next_dirty_window()) is not None:
            if ram.queue_window(channel, *window) and channel.pending_bytes >= FLUSH_BYTES:
                await channel.flush()
        if ram.file_pages is not None:
            ram.file_pages.write_bitmaps()  # the last pages are in their slots
        channel.put(codec.encode_ram_section_close(RAM_SECTION_ID))
        state = await self.guest.save_state()
        channel.put(codec.encode_device_section(GUEST_SECTION_ID, "guest", 0, 1, state))
        channel.put(codec.encode_eof())
        await channel.flush()
        self.stats.downtime_bytes = self._bytes_moved() - bytes_before
        self.stats.transferred = self._bytes_moved()
        self.stats.remaining = 0
        if self._uses_return_path:
            await self._return_path.wait_for_shut()
        else:
            await channel.send_eof()
        self.stats.downtime_ns = time.monotonic_ns() - self.stats.downtime_start_ns

    # -- postcopy ------------------------------------------------------------------------

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
        await self._stop_guest()
        trace("postcopy_guest_stopped")
        bytes_before = self._bytes_moved()
        channel.put(codec.encode_switchover_start())
        saved: list[bytes] = []
        async with open_nursery() as nursery:
            # The guest saves its state while the dirty log is synced and the discards built.
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
        await self._postcopy_stream(channel, ram, urgent_sender, hold=self._background_released)

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
        await self._return_path.wait_for_shut()
        self.stats.postcopy_bytes += self._bytes_moved() - postcopy_start
        self.stats.transferred = self._bytes_moved()

    async def _save_state_into(self, saved: list[bytes]) -> None:
        saved.append(await self.guest.save_state())

    async def _pass_barrier(self, channel: MigrationChannel) -> None:
        """Wait until the destination has applied every record sent so far (PING, PONG).

        With one-sided writes a page's data lands in the destination's memory at once,
        but a ZERO record of the same page from an earlier pass lands only when the
        destination reads it: it would punch out the newer data. No page is sent twice
        in one pass, so a barrier between passes orders every page's versions."""
        self._barriers += 1
        value = PASS_BARRIER_PING + self._barriers
        channel.put(codec.encode_ping(value))
        await channel.flush()
        with trio.move_on_after(SHUT_TIMEOUT) as scope:
            await self._return_path.pong(value).wait()
        if scope.cancelled_caught:
            raise TransportError(
                f"the destination did not answer PING {value:#x} within {SHUT_TIMEOUT:.0f} s"
            )
        self._return_path.check()

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
