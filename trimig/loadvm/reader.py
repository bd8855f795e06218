"""Small pieces shared by the destination's stream readers."""

from __future__ import annotations

import trio

from .. import codec
from ..channel import MigrationChannel
from ..codec._base import DecoderBase
from ..errors import TransportError


async def next_event(decoder: DecoderBase[codec.StreamEvent] | DecoderBase[codec.RamEvent],
                     channel: MigrationChannel) -> object:
    """The decoder's next event, reading from ``channel`` as needed (EOF is fed to the decoder)."""
    while True:
        event = decoder.next_event()
        if event is not codec.NEED_DATA:
            return event
        if not await channel.receive_into_decoder(decoder):
            decoder.receive_eof()


#: A return-path message that the source does not take within this long breaks the path.
RETURN_PATH_SEND_TIMEOUT = 10.0


class ReturnPathWriter:
    """Serialises writers of the return path (loader, fault handler, listener), as QEMU's mutex.

    A message goes out whole or not at all: cancelling the task that sends it (say the
    fault handler, when postcopy ends) must not leave half a frame on the path, so the
    write itself is shielded and bounded by RETURN_PATH_SEND_TIMEOUT instead.
    """

    def __init__(self, channel: MigrationChannel) -> None:
        self._channel = channel
        self._lock = trio.Lock()

    async def send(self, message: bytes) -> None:
        async with self._lock:
            self._channel.put(message)
            with trio.CancelScope(shield=True), trio.move_on_after(
                RETURN_PATH_SEND_TIMEOUT
            ) as bound:
                await self._channel.flush()
            if bound.cancelled_caught:
                raise TransportError(
                    f"the source did not take a {len(message)}-byte return-path message "
                    f"within {RETURN_PATH_SEND_TIMEOUT:g} s"
                )
