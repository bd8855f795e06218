"""The destination side of a migration: one IncomingMigration object per migration.

It owns the destination's RAM blocks and its guest process until the migration
completes; then :meth:`IncomingMigration.take_guest` hands both to the caller.
A failed or cancelled incoming migration closes the guest, the blocks and the
connection, and reports ``failed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from trio_util import AsyncValue

from .. import codec
from ..channel import MigrationChannel
from ..errors import MigrationFailed, RemoteProtocolError
from ..guest.host import GuestProcess
from ..migration import MigrationCapabilities, MigrationStatus
from ..ram import RamBlock, RamBlockSpec, create_blocks
from ..transports import ByteStream, listen
from .ram import RamLoader

log = logging.getLogger("trimig.loadvm")

CLEANUP_TIMEOUT = 10.0
KNOWN_DEVICE_SECTIONS = ("guest",)

EventCallback = Callable[[str, dict[str, Any]], None]


class IncomingMigration:
    """Receives one migration into fresh RAM blocks and starts the guest on them."""

    def __init__(
        self,
        specs: Sequence[RamBlockSpec],
        *,
        guest_command: Sequence[str] | None = None,
        capabilities: MigrationCapabilities | None = None,
        listen_options: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.specs = list(specs)
        self.guest_command = guest_command
        self.capabilities = capabilities or MigrationCapabilities()
        self.status: AsyncValue[MigrationStatus] = AsyncValue(MigrationStatus.NONE)
        self.blocks: list[RamBlock] = []
        self.guest: GuestProcess | None = None
        self.error_desc = ""
        self.start_ns = 0
        self.end_ns = 0
        self._listen_options = listen_options or {}
        self._on_event = on_event
        self._device_state: bytes | None = None
        self._return_path: MigrationChannel | None = None

    def _set_status(self, status: MigrationStatus) -> None:
        if self.status.value is status:
            return
        log.info("incoming status %s -> %s", self.status.value.value, status.value)
        self.status.value = status
        if self._on_event:
            self._on_event("MIGRATION", {"status": status.value})

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status.value.value}
        if self.error_desc:
            info["error-desc"] = self.error_desc
        return info

    def take_guest(self) -> tuple[GuestProcess, list[RamBlock]]:
        """After completion: hand the running guest and its blocks to the caller, who closes them."""
        if self.guest is None or self.status.value is not MigrationStatus.COMPLETED:
            raise RuntimeError("the incoming migration has not completed")
        guest, blocks = self.guest, self.blocks
        self.guest, self.blocks = None, []
        return guest, blocks

    async def listen_and_run(
        self, uri: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``uri``, report the real address through ``task_status``, load one migration."""
        self._set_status(MigrationStatus.SETUP)
        try:
            listener = await listen(uri, **self._listen_options)
        except BaseException as exc:
            await self._fail(exc)
            raise
        try:
            task_status.started(str(listener.address))
            stream = await listener.accept()
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await listener.aclose()
            await self._fail(exc)
            raise
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            await listener.aclose()
        await self.run(stream)

    async def run(self, stream: ByteStream) -> None:
        """Load a migration from an accepted stream. Completed on return; else raises."""
        self._set_status(MigrationStatus.SETUP)
        self.start_ns = time.monotonic_ns()
        try:
            try:
                self.blocks = create_blocks(self.specs)
                self.guest = await GuestProcess.start(self.guest_command)
                channel = MigrationChannel(stream)
                self._set_status(MigrationStatus.ACTIVE)
                await self._load(channel)
                await self._start_guest()
                if self._return_path is not None:
                    self._return_path.put(codec.encode_rp_shut(0))
                    await self._return_path.flush()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    await stream.aclose()
        except BaseException as exc:
            await self._fail(exc, stream_error=True)
            if isinstance(exc, Exception):
                raise MigrationFailed(f"incoming migration failed: {self.error_desc}") from exc
            raise
        self.end_ns = time.monotonic_ns()
        self._set_status(MigrationStatus.COMPLETED)

    async def _fail(self, exc: BaseException, *, stream_error: bool = False) -> None:
        self.error_desc = str(exc) or type(exc).__name__
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            if stream_error and self._return_path is not None:
                try:
                    self._return_path.put(codec.encode_rp_shut(1))
                    await self._return_path.flush()
                except Exception:
                    log.debug("could not send SHUT(1)", exc_info=True)
            await self.aclose()
        self._set_status(MigrationStatus.FAILED)

    async def aclose(self) -> None:
        """Stop the guest (if still ours) and free the blocks. Safe to call more than once."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            if self.guest is not None:
                await self.guest.aclose()
                self.guest = None
        for block in self.blocks:
            block.close()
        self.blocks = []

    async def _load(self, channel: MigrationChannel) -> None:
        decoder = codec.StreamDecoder()
        ram = RamLoader(self.blocks)
        postcopy_advised = False
        while True:
            event = decoder.next_event()
            if event is codec.NEED_DATA:
                if not await channel.receive_into_decoder(decoder):
                    decoder.receive_eof()
                continue
            if isinstance(event, codec.RamPages):
                ram.load_pages(event)
            elif isinstance(event, codec.RamZeroPages):
                ram.load_zero_pages(event)
            elif isinstance(event, codec.RamWritten):
                ram.pages_written_remotely(event)
            elif isinstance(event, codec.RamMemSize):
                ram.check_mem_size(event, postcopy=postcopy_advised)
                await self._register_regions(channel)
            elif isinstance(event, (codec.SectionStart, codec.SectionFull)):
                if event.idstr != "ram" and event.idstr not in KNOWN_DEVICE_SECTIONS:
                    raise RemoteProtocolError(
                        f"unknown section {event.idstr!r} (instance {event.instance_id})"
                    )
            elif isinstance(event, codec.DeviceState):
                self._device_state = event.data
            elif isinstance(event, codec.OpenReturnPath):
                self._return_path = channel.return_path()
            elif isinstance(event, codec.Ping):
                if self._return_path is None:
                    raise RemoteProtocolError("PING received but no return path is open")
                self._return_path.put(codec.encode_rp_pong(event.value))
                await self._return_path.flush()
            elif isinstance(event, codec.PostcopyAdvise):
                postcopy_advised = True
            elif isinstance(event, codec.EndOfStream):
                break
            elif isinstance(
                event,
                (
                    codec.FileHeader,
                    codec.Configuration,
                    codec.SectionPart,
                    codec.SectionEnd,
                    codec.SectionFooter,
                    codec.RamEndOfSection,
                    codec.SwitchoverStart,
                ),
            ):
                continue
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} in a precopy stream")
        if self._device_state is None:
            raise RemoteProtocolError("the stream ended without the guest's device state")

    async def _register_regions(self, channel: MigrationChannel) -> None:
        """On the RDMA-shaped transport, offer our blocks as regions the source writes into."""
        regions = channel.stream.regions
        if regions is None:
            return
        for block in self.blocks:
            await regions.register(block.name, block.fd, block.size, block.mapping.buffer)

    async def _start_guest(self) -> None:
        assert self.guest is not None and self._device_state is not None
        await self.guest.attach(self.blocks, "incoming")
        await self.guest.load_state(self._device_state)
        await self.guest.cont()
        if self._on_event:
            self._on_event("RESUME", {})
