"""The destination side of a migration: one IncomingMigration object per migration.

It owns the destination's RAM blocks and its guest process until the migration
completes; then :meth:`IncomingMigration.take_guest` hands both to the caller.
A failed or cancelled incoming migration closes the guest, the blocks and the
connection, and reports ``failed``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from .. import codec
from .._trio import open_nursery
from ..channel import MigrationChannel
from ..codec.constants import QEMU_VM_PING_PACKAGED_LOADED
from ..errors import (
    ConfigError,
    MigrationFailed,
    MigrationPaused,
    RemoteProtocolError,
    TransportError,
)
from ..guest.host import GuestProcess
from ..loops import feed_from_channel, next_event
from ..migration import MigrationStatus
from ..postcopy import PostcopyState
from ..ram_blocks import RamBlock
from ..snapshot.eager import load_eagerly
from ..snapshot.file import open_snapshot
from ..snapshot.lazy import LazyRestore
from ..trace import trace
from ..transports import (
    ByteStream,
    FileAddress,
    Listener,
    listen,
    parse_uri,
    set_channel_timeout,
)
from .destination_state import CLEANUP_TIMEOUT
from .postcopy import PostcopyIncoming
from .ram_loader import RamLoader
from .reader import ReturnPathWriter
from .recovery import PostcopyRecovery

log = logging.getLogger("trimig.loadvm")

#: Without a return path, how long the source may take to end the stream after its EOF.
END_OF_STREAM_TIMEOUT = 10.0
KNOWN_DEVICE_SECTIONS = ("guest",)
_IGNORED_EVENTS = (
    codec.FileHeader,
    codec.Configuration,
    codec.SectionPart,
    codec.SectionEnd,
    codec.SectionFooter,
    codec.RamEndOfSection,
    codec.SwitchoverStart,
    codec.VmDescription,
)


class IncomingMigration(PostcopyRecovery):
    """Receives one migration into fresh RAM blocks and starts the guest on them.

    Built in layers (destination_state.py): its state and the steps every path takes
    (DestinationState), pause and recovery (PostcopyRecovery); here listening,
    query-migrate, ``run`` and the reading of the stream."""

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status.value.value}
        if self.socket_address is not None:
            info["socket-address"] = [self.socket_address]
        stats = self._postcopy.statistics() if self._postcopy is not None else self.postcopy_stats
        info.update(stats)
        if self._lazy is not None:
            info.update(self._lazy.statistics())
        if self.error_desc:
            info["error-desc"] = self.error_desc
        if self.recoveries:
            info["x-postcopy-recoveries"] = self.recoveries
        return info

    def dump_bitmaps(self) -> str:
        """Text dump of each block's received bitmap (QEMU's ram_debug_dump_bitmap)."""
        if self._ram is None:
            return ""
        return "".join(
            f"{name} received:\n{self._ram.received.dump(name)}" for name in self._ram.received
        )

    def take_guest(self) -> tuple[GuestProcess, list[RamBlock]]:
        """After completion: hand the running guest and its blocks (the caller closes them)."""
        if self.guest is None or self.status.value is not MigrationStatus.COMPLETED:
            raise RuntimeError("the incoming migration has not completed")
        guest, blocks = self.guest, self.blocks
        self.guest, self.blocks = None, []
        return guest, blocks

    async def listen_and_run(
        self, uri: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``uri``, report the real address through ``task_status``, load one migration.

        The listener stays open while the migration runs: in postcopy the source opens a
        second connection for urgent pages.
        """
        self._set_status(MigrationStatus.SETUP)
        try:
            address = parse_uri(uri)
            if self.capabilities.mapped_ram:
                if not isinstance(address, FileAddress):
                    raise ConfigError(f"Migration requires seekable transport (e.g. file): {uri!r}")
                self.socket_address = str(address)
                task_status.started(self.socket_address)
                await self._load_mapped_ram(address)
                return
            listener = await listen(address, **self._listen_options)
        except BaseException as exc:
            if self.status.value is not MigrationStatus.FAILED:
                await self._fail(exc)
            if isinstance(exc, Exception) and self.socket_address is not None:
                raise MigrationFailed(f"incoming migration failed: {self.error_desc}") from exc
            raise
        try:
            self.socket_address = str(listener.address)
            task_status.started(self.socket_address)
            try:
                # The guest is up before the source's first byte, as QEMU's -incoming is:
                # its start-up never adds to a switch-over that comes right away.
                await self._prepare()
                stream = await listener.accept()
            except BaseException as exc:
                await self._fail(exc)
                raise
            try:
                await self.run(stream, listener=listener)
            except MigrationPaused as exc:
                await self._recover_automatically(listener, exc)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await listener.aclose()

    async def run(self, stream: ByteStream, *, listener: Listener | None = None) -> None:
        """Load a migration from an accepted stream. Completed on return; else raises.

        ``listener``, when given, accepts the postcopy urgent-page connection.
        """
        self._set_status(MigrationStatus.SETUP)
        self.start_ns = time.monotonic_ns()
        self._stream = stream
        try:
            try:
                await self._prepare()
                channel = MigrationChannel(stream)
                # Dead-peer detection: the source's main stream never pauses for long, so
                # a silence of x-channel-timeout means the source or the link is gone.
                channel.receive_timeout = self.parameters.channel_timeout
                set_channel_timeout(stream, self.parameters.channel_timeout)
                async with open_nursery() as nursery:
                    self._set_status(MigrationStatus.ACTIVE)
                    await self._load(channel, nursery, listener)
                    if (
                        self._postcopy is not None
                        and self._postcopy.state.state >= PostcopyState.LISTENING
                    ):
                        await self._finish_postcopy(self._postcopy)
                    else:
                        await self._start_guest()
                    if self._return_path is not None:
                        await self._return_path.send(codec.encode_rp_shut(0))
                    nursery.cancel_scope.cancel()
            except BaseException:
                # The source learns our verdict before the connection goes: it fails (and
                # resumes its guest) on SHUT(1) instead of guessing from a reset.
                if not self._guest_runs_here():
                    await self._send_shut_failed()
                raise
            finally:
                if self._postcopy is not None:
                    self.postcopy_stats = self._postcopy.statistics()
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    await stream.aclose()
        except BaseException as exc:
            if self._guest_runs_here():
                self._pause(exc)
            await self._fail(exc)
            if isinstance(exc, Exception):
                raise MigrationFailed(f"incoming migration failed: {self.error_desc}") from exc
            raise
        self.end_ns = time.monotonic_ns()
        self._set_status(MigrationStatus.COMPLETED)

    async def _load_mapped_ram(self, address: FileAddress) -> None:
        """``file:`` with mapped-ram: every page read from its slot, then the guest runs
        (QEMU loads the whole file too, inside the RAM section's START)."""
        self.start_ns = time.monotonic_ns()
        await self._prepare()
        self._set_status(MigrationStatus.ACTIVE)
        with open_snapshot(address.path, address.offset) as snapshot:
            snapshot.check_blocks(self.specs)
            self._device_state = snapshot.device_state
            if not self.capabilities.x_lazy_restore:
                await trio.to_thread.run_sync(load_eagerly, snapshot, self.blocks)
                await self._start_guest()
            else:
                assert self.guest is not None
                lazy = self._lazy = LazyRestore(snapshot, self.blocks, self.guest)
                async with open_nursery() as nursery:
                    await nursery.start(lazy.run)
                    if self._on_event:
                        self._on_event("RESUME", {})
        self.end_ns = time.monotonic_ns()
        self._set_status(MigrationStatus.COMPLETED)

    async def _load(
        self, channel: MigrationChannel, nursery: trio.Nursery, listener: Listener | None
    ) -> None:
        """Read the main stream until its end (precopy) or until POSTCOPY_RUN (postcopy)."""
        decoder = codec.StreamDecoder(
            local_page_sizes={block.name: block.page_size for block in self.blocks}
        )
        ram = self._ram = RamLoader(self.blocks)
        self._decoder = decoder
        while True:
            event = await next_event(decoder, channel)
            if isinstance(event, codec.RamPages):
                ram.load_pages(event)
            elif isinstance(event, codec.RamZeroPages):
                ram.load_zero_pages(event)
            elif isinstance(event, codec.RamWritten):
                ram.pages_written_remotely(event)
            elif isinstance(event, codec.RamMemSize):
                ram.check_mem_size(event, postcopy=self._postcopy is not None)
                await self._register_regions(channel)
            elif isinstance(event, codec.EndOfStream):
                await self._read_to_the_end(decoder, channel)
                break
            elif isinstance(event, codec.PostcopyAdvise):
                if not self.capabilities.postcopy_ram:
                    raise RemoteProtocolError(
                        "the source advises postcopy but postcopy-ram is off here"
                    )
                if self._return_path is None:
                    raise RemoteProtocolError("POSTCOPY_ADVISE without a return path")
                assert self.guest is not None
                self._postcopy = PostcopyIncoming(
                    nursery, self.guest, self.blocks, ram, self._return_path, listener
                )
                self._postcopy.channel_timeout = channel.receive_timeout
                await self._postcopy.advise(event)
            elif isinstance(event, codec.PostcopyRamDiscard):
                self._require_postcopy(event).discard(event)
            elif isinstance(event, codec.Packaged):
                trace("postcopy_package", length=len(event.blob))
                await self._load_package(event.blob, channel, decoder)
                return
            elif isinstance(event, codec.Ping) and self._return_path is not None:
                await self._pong_main_stream(event)
            else:
                await self._handle_common(event, channel)
        if self._device_state is None:
            raise RemoteProtocolError("the stream ended without the guest's device state")

    async def _read_to_the_end(
        self, decoder: codec.StreamDecoder, channel: MigrationChannel
    ) -> None:
        """After a precopy QEMU_VM_EOF only a VM description may follow; the decoder refuses
        anything else, naming the bytes.

        Without a return path the source has nothing to wait for and ends the main channel
        right after EOF, so read up to that end: a byte after EOF fails the migration
        whenever it comes. With one, the source (QEMU's as ours) keeps the channel open
        until our SHUT, so we cannot wait for its end: we refuse what came with the EOF
        (and finish a VM description that began), then decide.
        """
        to_the_end = self._return_path is None
        with trio.move_on_after(END_OF_STREAM_TIMEOUT) as bound:
            while True:
                event = decoder.next_event()
                if event is codec.NEED_DATA:
                    if not to_the_end and not decoder.buffered:
                        return
                    await feed_from_channel(decoder, channel)
                elif isinstance(event, codec.ChannelClosed):
                    return
                elif not isinstance(event, codec.VmDescription):
                    raise RemoteProtocolError(
                        f"unexpected {type(event).__name__} after QEMU_VM_EOF"
                    )
        if bound.cancelled_caught:
            raise TransportError(
                f"the source did not end the stream within {END_OF_STREAM_TIMEOUT:g} s of "
                "its QEMU_VM_EOF"
            )

    async def _pong_main_stream(self, event: codec.Ping) -> None:
        """Answer a PING of the main stream. As in QEMU, a PONG that cannot go out does not
        end the load: the main stream then tells what happened to the source (it ends
        short), or the final SHUT fails. (A PING in the package is another matter: PONG
        0x42 commits both sides, and failing to send it fails the migration.)"""
        assert self._return_path is not None
        try:
            await self._return_path.send(codec.encode_rp_pong(event.value))
        except TransportError as exc:
            log.info("could not answer PING(%d) on the return path: %s", event.value, exc)

    def _require_postcopy(self, event: object) -> PostcopyIncoming:
        if self._postcopy is None:
            raise RemoteProtocolError(f"{type(event).__name__} without POSTCOPY_ADVISE first")
        return self._postcopy

    async def _handle_common(self, event: object, channel: MigrationChannel) -> None:
        """Events valid both in the main stream and inside a package."""
        if isinstance(event, (codec.SectionStart, codec.SectionFull)):
            if event.idstr != "ram" and event.idstr not in KNOWN_DEVICE_SECTIONS:
                raise RemoteProtocolError(
                    f"unknown section {event.idstr!r} (instance {event.instance_id})"
                )
        elif isinstance(event, codec.DeviceState):
            self._device_state = event.data
        elif isinstance(event, codec.OpenReturnPath):
            self._return_path = ReturnPathWriter(channel.return_path())
        elif isinstance(event, codec.Ping):
            if self._return_path is None:
                raise RemoteProtocolError("PING received but no return path is open")
            await self._return_path.send(codec.encode_rp_pong(event.value))
        elif not isinstance(event, _IGNORED_EVENTS):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} in the stream")

    async def _load_package(
        self, blob: bytes, channel: MigrationChannel, decoder: codec.StreamDecoder
    ) -> None:
        """PACKAGED: LISTEN, the device state, PINGs and RUN, read from memory.

        The main stream is free meanwhile: at LISTEN its listener task takes it over,
        so a device load that touches missing RAM can be served.
        """
        postcopy = self._require_postcopy("PACKAGED")
        # The codec refuses a blob that ends before POSTCOPY_RUN or holds EOF or PACKAGED.
        package = decoder.package_decoder(blob)
        confirmed = False
        pongs: list[int] = []  # the package's PINGs, answered in one send (in the pause)
        while True:
            event = package.next_event()
            if postcopy.error is not None and not confirmed:
                # The main stream broke while the package loads: the source will resume the
                # guest, so confirm nothing and run nothing.
                raise postcopy.error
            if isinstance(event, codec.Ping):
                # They follow the device state; each goes out with PONG(0x42), or at RUN
                # for a source that sends none (QEMU before 10.2).
                pongs.append(event.value)
                if event.value == QEMU_VM_PING_PACKAGED_LOADED:
                    # PONG(0x42) commits both sides: once it is out, the source pauses
                    # instead of resuming on a failure, so from here on the guest must run here.
                    await self._send_pongs(pongs)
                    confirmed = True
            elif isinstance(event, codec.PostcopyListen):
                await postcopy.listen(channel, decoder)
                self._set_status(MigrationStatus.POSTCOPY_DEVICE)
            elif isinstance(event, codec.DeviceState):
                if postcopy.state.state < PostcopyState.LISTENING:
                    raise RemoteProtocolError("device state in the package before POSTCOPY_LISTEN")
                self._device_state = event.data
                assert self.guest is not None
                # The load may read memory that is still arriving: its deadline counts
                # from the last page placed, not from the request.
                await self.guest.load_state(event.data, progress=postcopy.pages_placed)
                trace("postcopy_state_loaded")
            elif isinstance(event, codec.PostcopyRun):
                if self._device_state is None:
                    raise RemoteProtocolError("POSTCOPY_RUN before the guest's device state")
                await self._send_pongs(pongs)
                await postcopy.run_guest()
                trace("postcopy_guest_running")
                self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
                if self._on_event:
                    self._on_event("RESUME", {})
                return
            else:
                await self._handle_common(event, channel)

    async def _send_pongs(self, values: list[int]) -> None:
        """Answer the PINGs ``values`` in one return-path send, then forget them."""
        if not values:
            return
        if self._return_path is None:
            raise RemoteProtocolError("PING received but no return path is open")
        await self._return_path.send(b"".join(codec.encode_rp_pong(value) for value in values))
        values.clear()

    async def _register_regions(self, channel: MigrationChannel) -> None:
        """On the RDMA-shaped transport, offer our blocks as regions the source writes into."""
        regions = channel.stream.regions
        if regions is None:
            return
        for block in self.blocks:
            await regions.register(block.name, block.fd, block.size, block.mapping.buffer)
