"""The synchronous steps of one TLS session (sans-io): stdlib ssl's ``SSLObject`` over a
pair of ``MemoryBIO``, so that any driver (the trio ``TlsStream``; a thread loop) moves
its ciphertext over whatever transport it has.

The costs that matter are per call, not per byte (AES-GCM runs at gigabytes per second on
one core): :meth:`TlsSession.encrypt` turns a whole batch of pages into many 16 KiB records
in few C calls and hands back their ciphertext in one buffer; :meth:`TlsSession.feed`
takes whatever one large receive brought (many records) and :meth:`TlsSession.read_into`
decrypts every complete record straight into the caller's buffer.

A session is not thread-safe: one driver at a time.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence

from trimig.kernel.iov import Buffer

#: Plaintext bytes of one TLS record (the most a record holds).
RECORD = 1 << 14
#: Small buffers are joined into writes of about this many bytes (few, large writes).
WRITE_CHUNK = 1 << 20


class TlsSession:
    """One TLS connection's state, without I/O.

    Drive the handshake with :meth:`handshake_step` (send :meth:`take_output` after every
    step, :meth:`feed` what arrives), then move data with :meth:`encrypt` and
    :meth:`feed`/:meth:`read_into`. ssl errors (``ssl.SSLError``) propagate.
    """

    __slots__ = ("_incoming", "_outgoing", "ended", "ssl_object")

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        #: The peer ended the session (close_notify, or the transport's EOF).
        self.ended = False

    def handshake_step(self) -> bool:
        """Advance the handshake with what was fed; True once it is complete."""
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    @property
    def output_pending(self) -> int:
        """Bytes of ciphertext waiting for :meth:`take_output`."""
        return self._outgoing.pending

    def take_output(self) -> bytes:
        """The ciphertext produced so far (handshake messages, records, alerts), to send."""
        return self._outgoing.read()

    def encrypt(self, buffers: Sequence[Buffer], *, limit: int = WRITE_CHUNK) -> list[bytes]:
        """Encrypt every byte of ``buffers`` in order; the ciphertext, in pieces of about
        ``limit`` bytes (with any output already pending first). Small buffers are joined
        (a record per 4 KiB page would cost a call and 22 bytes each); large ones are
        encrypted where they lie."""
        pieces: list[bytes] = []
        small: list[Buffer] = []
        size = 0
        write = self.ssl_object.write
        for buffer in buffers:
            length = buffer.nbytes if type(buffer) is memoryview else memoryview(buffer).nbytes
            if length >= RECORD:
                if small:
                    write(b"".join(small))
                    small, size = [], 0
                write(buffer)
            else:
                small.append(buffer)
                size += length
                if size >= limit:
                    write(b"".join(small))
                    small, size = [], 0
            if self._outgoing.pending >= limit:
                pieces.append(self._outgoing.read())
        if small:
            write(b"".join(small))
        if self._outgoing.pending:
            pieces.append(self._outgoing.read())
        return pieces

    def feed(self, ciphertext: Buffer) -> None:
        """Hand over bytes received from the peer; empty means the transport's EOF."""
        if memoryview(ciphertext).nbytes:
            self._incoming.write(ciphertext)
        else:
            self._incoming.write_eof()

    def read_into(self, buffer: memoryview) -> int | None:
        """Decrypt the complete records fed so far into ``buffer`` (non-empty): the count
        (at least one), 0 once the peer ended the session, or None when more ciphertext
        is needed. An end without close_notify counts as an end (the migration stream has
        its own end markers, and QEMU tolerates it)."""
        have = 0
        room = buffer.nbytes
        read = self.ssl_object.read
        while have < room and not self.ended:
            try:
                count = int(read(room - have, buffer[have:]))  # a count, given a buffer
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0
            if not count:
                self.ended = True
                break
            have += count
        if have:
            return have
        return 0 if self.ended else None

    def close_notify(self) -> bytes:
        """The close_notify alert to send (empty if the session cannot send one)."""
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's is not awaited
            self.ssl_object.unwrap()
        return self._outgoing.read()

    def has_ticket(self) -> bool:
        """Whether the peer (a TLS 1.3 server) has sent a session ticket: it does that only
        once it has accepted the client's certificate."""
        try:
            session = self.ssl_object.session
        except ValueError:  # none yet (3.11 cannot copy a session mid-handshake)
            return False
        return session is not None and session.has_ticket
