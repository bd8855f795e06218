"""The destination's side of postcopy pause and recovery (a layer of IncomingMigration;
see destination_state.py).

After RUN the guest exists only in two halves: a break pauses the migration
(postcopy-paused) instead of failing it. ``recover`` takes a new connection from the
source (docs/postcopy.md, "Recovery"): the new channel continues the main stream, each
RECV_BITMAP is answered with the block's received bitmap, POSTCOPY_RESUME with
RESUME_ACK(1) and the page requests still waiting. With x-postcopy-auto-recover the
listener of the migration takes the source's next connections as attempts by itself.
"""

from __future__ import annotations

import logging
import time

import trio

from .. import codec
from .._trio import open_nursery, sole_error
from ..channel import MigrationChannel
from ..errors import ConfigError, MigrationPaused, RemoteProtocolError, TransportError
from ..loops import next_event
from ..migration import MigrationStatus
from ..trace import trace
from ..transports import ByteStream, Listener, listen, set_channel_timeout, shutdown_stream
from ..transports.base import Address, ListenerBase
from .destination_state import CLEANUP_TIMEOUT, DestinationState
from .postcopy import PostcopyIncoming
from .reader import ReturnPathWriter

log = logging.getLogger("trimig.loadvm")


class PostcopyRecovery(DestinationState):
    """migrate-pause, the pause after a break past RUN, and the recovery."""

    async def _recover_automatically(self, listener: Listener, error: MigrationPaused) -> None:
        """x-postcopy-auto-recover: after a pause, take the source's next connections on
        the same listener as recovery attempts, up to that many consecutive failed ones
        (one that got postcopy running again restores the budget). Raises the last
        MigrationPaused once the budget is spent (at once with none)."""
        failed, attempts = 0, self.parameters.x_postcopy_auto_recover
        while failed < attempts:
            stream = await listener.accept()
            if self.status.value is not MigrationStatus.POSTCOPY_PAUSED:
                await stream.aclose()  # an operator's migrate-recover took over
                return
            before = self.recoveries
            try:
                await self.recover(stream, listener=listener)
                return
            except MigrationPaused as exc:
                error = exc
            failed = 0 if self.recoveries > before else failed + 1
            log.warning("automatic recovery attempt failed (%d of %d): %s", failed, attempts, error)
        raise error

    def pause(self) -> None:
        """migrate-pause: shut the main stream down on purpose (as QEMU does); the
        migration then pauses, ready for a recovery."""
        self._require_pausable()
        self._pause_requested = True
        if self._stream is not None:
            shutdown_stream(self._stream)

    def _pause(self, exc: BaseException) -> None:
        """After RUN the guest exists only in two halves: stop here, paused, and say so
        (raise MigrationPaused, or re-raise a cancellation). Every postcopy task has
        ended; what a recovery needs stays."""
        if self._pause_requested:
            self.error_desc = "paused by migrate-pause"
        else:
            self.error_desc = str(sole_error(exc)) or type(sole_error(exc)).__name__
        self._pause_requested = False
        log.error("postcopy paused: %s", self.error_desc)
        if self._postcopy is not None:
            self._postcopy.paused()
        self._set_status(MigrationStatus.POSTCOPY_PAUSED)
        if isinstance(exc, Exception):
            raise MigrationPaused(
                f"postcopy broke after the guest started here: {self.error_desc}"
            ) from exc
        raise exc

    async def recovery_listener(self, uri: str) -> Listener:
        """migrate-recover: listen on ``uri`` for the source's recovery connections, with
        this migration's listen options (TLS)."""
        return await listen(uri, **self._listen_options)

    async def recover(self, stream: ByteStream, *, listener: Listener | None = None) -> None:
        """Postcopy recovery over ``stream``, a new connection from the source (accepted
        after migrate-recover; ``listener`` accepts its urgent channel). Completed on
        return; MigrationPaused (back in postcopy-paused, ready for another) if the
        handshake fails or the link breaks again.

        The handshake (docs/postcopy.md, "Recovery"): the new channel continues the main
        stream without a header; each RECV_BITMAP is answered with the block's received
        bitmap, POSTCOPY_RESUME with RESUME_ACK(1) and the requests still waiting."""
        postcopy, decoder = self._postcopy, self._decoder
        status = self.status.value
        if status is not MigrationStatus.POSTCOPY_PAUSED or postcopy is None or decoder is None:
            raise ConfigError(
                "postcopy recovery needs a paused postcopy (postcopy-paused); the incoming "
                f"migration is {status.value}"
            )
        self._set_status(MigrationStatus.POSTCOPY_RECOVER)
        self._stream = stream
        try:
            try:
                channel = MigrationChannel(stream)
                channel.receive_timeout = self.parameters.channel_timeout
                set_channel_timeout(stream, self.parameters.channel_timeout)
                return_path = self._return_path = ReturnPathWriter(channel.return_path())
                decoder = self._decoder = decoder.successor()
                async with open_nursery() as nursery:
                    if listener is not None:
                        # The source connects the urgent channel during the handshake
                        # (QEMU's order), and over TLS that connect waits for our accept.
                        listener = early = EarlyAccept(listener)
                        nursery.start_soon(early.run)
                    await self._recovery_handshake(decoder, channel, return_path, postcopy)
                    self.error_desc = ""  # recovered: the pause's reason is history
                    self.recoveries += 1
                    self._set_status(MigrationStatus.POSTCOPY_ACTIVE)
                    if postcopy.finished:
                        # Paused after every page was placed, the SHUT lost: only the
                        # stream's end (and, with preempt, the urgent channel's) is left.
                        await return_path.send(codec.encode_rp_resume_ack())
                        if listener is not None:
                            nursery.start_soon(postcopy.drain_urgent, listener)
                        await postcopy.read_the_end(channel, decoder)
                    else:
                        await postcopy.resume(nursery, channel, decoder, return_path, listener)
                        await self._finish_postcopy(postcopy)
                    await return_path.send(codec.encode_rp_shut(0))
                    nursery.cancel_scope.cancel()
            finally:
                self.postcopy_stats = postcopy.statistics()
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    await stream.aclose()
        except BaseException as exc:
            self._pause(exc)
        self.end_ns = time.monotonic_ns()
        self._set_status(MigrationStatus.COMPLETED)

    async def _recovery_handshake(
        self,
        decoder: codec.StreamDecoder,
        channel: MigrationChannel,
        return_path: ReturnPathWriter,
        postcopy: PostcopyIncoming,
    ) -> None:
        """Answer each RECV_BITMAP with the block's received bitmap (every page, once
        ``postcopy.finished``), until POSTCOPY_RESUME."""
        assert self._ram is not None
        while True:
            event = await next_event(decoder, channel)
            if isinstance(event, codec.RecvBitmap):
                received = self._ram.received.block(event.block)
                if postcopy.finished:  # zero holes never placed are here too
                    received = received.copy()
                    received.fill(True)
                bitmap = received.to_le_bytes()
                await return_path.send(codec.encode_rp_recv_bitmap(event.block, bitmap))
            elif isinstance(event, codec.PostcopyResume):
                trace("postcopy_recover_resume")
                return
            elif isinstance(event, codec.ChannelClosed):
                raise TransportError("the source closed the new channel during the recovery")
            else:
                raise RemoteProtocolError(
                    f"unexpected {type(event).__name__} in the postcopy recovery handshake"
                )


class EarlyAccept(ListenerBase):
    """The urgent channel's listener during a recovery: ``run`` accepts the source's
    connection at once (over TLS the source's connect waits for that accept, and it
    connects before POSTCOPY_RESUME, when the urgent reader starts); ``accept`` hands
    it over. A connection never handed over is closed when ``run`` is cancelled."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._stream: ByteStream | None = None
        self._accepted = trio.Event()

    @property
    def address(self) -> Address:
        return self._listener.address

    async def run(self) -> None:
        self._stream = await self._listener.accept()
        self._accepted.set()
        try:
            await trio.sleep_forever()
        finally:
            if self._stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    await self._stream.aclose()

    async def accept(self) -> ByteStream:
        await self._accepted.wait()
        stream, self._stream = self._stream, None
        if stream is None:
            raise TransportError("the urgent channel was accepted once already")
        return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # the listener is its owner's
