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
from typing import Any

import trio

from .. import codec
from .._trio import open_nursery, sole_error
from ..channel import MigrationChannel
from ..errors import (
    ConfigError,
    MigrationFailed,
    TransportError,
    forget_locals,
)
from ..migration import MigrationStatus
from ..postcopy import PageRequestQueue, dump_bitmap
from ..trace import trace
from ..transports import FileStream
from . import convergence
from .mapped_ram import MappedRamWriter, check_transport, configuration
from .ram_saver import DirtyLog, RamSaver, send_part
from .recovery import PostcopyRecovery
from .return_path import SHUT_TIMEOUT, SourceReturnPath
from .source_state import (
    CLEANUP_TIMEOUT,
    FLUSH_BYTES,
    GUEST_SECTION_ID,
    ITERATION_SLICE,
    RAM_SECTION_ID,
)

log = logging.getLogger("trimig.savevm")

#: PING values of the barriers between precopy passes with one-sided writes (+ pass).
PASS_BARRIER_PING = 0x10000


class OutgoingMigration(PostcopyRecovery):
    """Moves one running guest to a destination. Create one per migration.

    Built in layers, one concern each (source_state.py): its state and the return path's
    messages (SourceState), the postcopy switch (PostcopySwitch), pause and recovery
    (PostcopyRecovery); here control, query-migrate, ``run`` and the precopy passes."""

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

    def query(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo for this migration."""
        self.stats.transferred = self._bytes_moved()
        if self._ram is not None and self.status.value.is_running:
            self.stats.remaining = self._ram.remaining_bytes
        info = self.stats.query(self.status.value)
        if self.recoveries:
            info["x-postcopy-recoveries"] = self.recoveries
        return info

    def dump_bitmaps(self) -> str:
        """Text dump of each block's dirty and sent bitmaps (QEMU's ram_debug_dump_bitmap)."""
        if self._ram is None:
            return ""
        parts = []
        for block in self.blocks:
            parts.append(f"{block.name} dirty:\n{dump_bitmap(self._ram.dirty[block.name])}")
            parts.append(f"{block.name} sent:\n{dump_bitmap(self._ram.sent[block.name])}")
        return "".join(parts)

    # -- the migration -------------------------------------------------------------------

    async def run(self, uri: str) -> None:
        """Migrate the guest to ``uri``. Returns once completed.

        Raises MigrationFailed (the guest runs on here), MigrationPaused (postcopy broke
        after the switch) or Cancelled."""
        if self.status.value is not MigrationStatus.NONE:
            raise ConfigError("an OutgoingMigration runs once; create a new one")
        self._set_status(MigrationStatus.SETUP)
        self._return_path = SourceReturnPath(self)
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
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    if self._urgent is not None:
                        await self._urgent.aclose()
                    if self._channel is not None:
                        await self._channel.aclose()  # drops unsent page views, closes the stream
                    else:
                        await stream.aclose()
        except BaseException as exc:
            forget_locals(exc)
            if self._ram is not None:
                self._ram.close()
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
            # So do the discard witnesses close after it: unmapping a GiB of watched pages
            # and closing their userfaultfd took 100-150 ms at load 8.
            if self._ram is not None:
                self._ram.close()
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await self.guest.untrack_dirty()
            if dirty_log is not None:
                dirty_log.close()

    # -- the precopy passes --------------------------------------------------------------

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
        # The header, the return path and ADVISE go before the RAM setup, as in QEMU's
        # migration thread: the destination readies its guest for postcopy (attach,
        # register-missing) while the first sync below runs (tens of ms for a GiB), so a
        # switch that comes right away does not wait for it.
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
        await channel.flush()
        ram = self._ram = RamSaver(self.blocks, self.stats)
        self._requests = PageRequestQueue(self.blocks)
        ram.sync(dirty_log)  # start the log afresh (every page is dirty anyway); hole map
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
