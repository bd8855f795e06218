"""The thread driver of a TLS session: the OS-thread fast paths over TLS.

:class:`TlsThreadStream` is a ``threads.ThreadStream`` over the same sans-io
:class:`~trimig.transports.tls_session.TlsSession` that the trio ``TlsStream`` drives,
with the same steps: a read decrypts the complete records already fed
(``readv_into``) and, when there are none, reads ciphertext from the transport's fd (the
base class's raw read) and feeds it; a write encrypts the batch (``encrypt_items``) and
writes the ciphertext whole (the base class's write). The crypto runs in the calling
thread (ssl releases the GIL in it). The fd only ever carries ciphertext: this driver
never hands it to a caller as the plain stream.

A TlsStream and its thread stream share the session: the owner of a channel moves its
reading (or writing) from one to the other, never does both at once (the session's
lock keeps a reader and a writer in two threads apart).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from trimig.errors import TransportError
from trimig.kernel.iov import GatherItem, IoVector
from trimig.threads import StopSignal, ThreadStream
from trimig.transports.tls_credentials import TlsError, describe_failure
from trimig.transports.tls_session import WRITE_CHUNK, TlsSession

#: Most ciphertext bytes one read takes from the fd (many records).
RAW_READ = 1 << 20


class TlsThreadStream(ThreadStream):
    """Plaintext read and written from an OS thread; ``fd`` carries the ciphertext."""

    __slots__ = ("_peer", "_raw_buffer", "_session", "_staging")

    def __init__(self, session: TlsSession, fd: int, *, peer: str) -> None:
        super().__init__(fd)
        self._session = session
        self._peer = peer
        self._raw_buffer: memoryview | None = None
        self._staging: memoryview | None = None

    def readv_into(
        self,
        buffers: Sequence[memoryview],
        stop: StopSignal,
        *,
        what: str,
        timeout: float | None = None,
    ) -> int | None:
        session = self._session
        if self._raw_buffer is None:
            self._raw_buffer = memoryview(bytearray(RAW_READ))
        try:
            while True:
                count = session.readv_into(buffers)
                if count is not None:
                    return count
                raw = super().readv_into([self._raw_buffer], stop, what=what, timeout=timeout)
                if raw is None:
                    return None
                session.feed(self._raw_buffer[:raw])
        except ssl.SSLError as error:
            raise self._failure(what, error) from error

    def write_all(self, buffers: Sequence[GatherItem], *, timeout: float, what: str) -> int:
        if self._staging is None:
            self._staging = memoryview(bytearray(WRITE_CHUNK))
        try:
            for pieces in self._session.encrypt_items(buffers, self._staging):
                super().write_all(pieces, timeout=timeout, what=what)
        except ssl.SSLError as error:
            raise self._failure(what, error) from error
        return sum(
            item.nbytes if isinstance(item, IoVector) else memoryview(item).nbytes
            for item in buffers
        )

    def _failure(self, what: str, error: ssl.SSLError) -> TransportError:
        reason = describe_failure(error, self._peer, handshake=False)
        return TlsError(f"TLS on {what} with {self._peer} failed: {reason}")
