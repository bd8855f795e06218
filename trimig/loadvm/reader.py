"""The destination's return-path writer, shared by the loader, fault handler and listener."""

from __future__ import annotations

import threading

import trio

from ..channel import MigrationChannel
from ..errors import TransportError
from ..threads import thread_stream

#: A return-path message that the source does not take within this long breaks the path.
RETURN_PATH_SEND_TIMEOUT = 10.0
#: How often a trio writer retries while a thread is writing (which takes microseconds).
_THREAD_WRITE_POLL = 0.0002


class ReturnPathWriter:
    """Serialises writers of the return path (loader, fault handler, listener), as QEMU's mutex.

    A message goes out whole or not at all: cancelling the task that sends it (say the
    fault handler, when postcopy ends) must not leave half a frame on the path, so the
    write itself is shielded and bounded by RETURN_PATH_SEND_TIMEOUT instead.

    When the stream has a thread stream (``threadsafe``: a socket, TLS over one), OS
    threads write too, with ``send_from_thread``: a lock shared with the trio writers
    keeps messages whole (and TLS records in the order they were encrypted).
    """

    def __init__(self, channel: MigrationChannel) -> None:
        self._channel = channel
        self._lock = trio.Lock()
        self._stream = thread_stream(channel.stream)
        self._write_lock = threading.Lock()

    @property
    def threadsafe(self) -> bool:
        """Whether ``send_from_thread`` works (the stream has a thread stream)."""
        return self._stream is not None

    async def send(self, message: bytes) -> None:
        async with self._lock:
            self._channel.put(message)
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(RETURN_PATH_SEND_TIMEOUT) as bound,
            ):
                while not self._write_lock.acquire(blocking=False):
                    await trio.sleep(_THREAD_WRITE_POLL)
                try:
                    await self._channel.flush()
                finally:
                    self._write_lock.release()
            if bound.cancelled_caught:
                raise TransportError(
                    f"the source did not take a {len(message)}-byte return-path message "
                    f"within {RETURN_PATH_SEND_TIMEOUT:g} s"
                )

    def send_from_thread(self, message: bytes) -> None:
        """Write ``message`` from an OS thread (blocking; ``threadsafe`` streams only).
        Raises TransportError if the source takes nothing for RETURN_PATH_SEND_TIMEOUT."""
        if self._stream is None:
            raise RuntimeError("send_from_thread needs a return path with a thread stream")
        with self._write_lock:
            self._stream.write_all(
                [message], timeout=RETURN_PATH_SEND_TIMEOUT, what="the return path"
            )
