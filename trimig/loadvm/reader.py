"""Small pieces shared by the destination's stream readers."""

from __future__ import annotations

import trio

from .. import codec
from ..channel import MigrationChannel
from ..codec._base import DecoderBase


async def next_event(decoder: DecoderBase[codec.StreamEvent] | DecoderBase[codec.RamEvent],
                     channel: MigrationChannel) -> object:
    """The decoder's next event, reading from ``channel`` as needed (EOF is fed to the decoder)."""
    while True:
        event = decoder.next_event()
        if event is not codec.NEED_DATA:
            return event
        if not await channel.receive_into_decoder(decoder):
            decoder.receive_eof()


class ReturnPathWriter:
    """Serialises writers of the return path (loader, fault handler, listener), as QEMU's mutex."""

    def __init__(self, channel: MigrationChannel) -> None:
        self._channel = channel
        self._lock = trio.Lock()

    async def send(self, message: bytes) -> None:
        async with self._lock:
            self._channel.put(message)
            await self._channel.flush()
