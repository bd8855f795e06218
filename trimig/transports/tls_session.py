"""The synchronous steps of one TLS session (sans-io): stdlib ssl's ``SSLObject`` over a
pair of ``MemoryBIO``, so that any driver (the trio ``TlsStream``; a thread loop) moves
its ciphertext over whatever transport it has.

The costs that matter are per call, not per byte (AES-GCM runs at gigabytes per second on
one core): :meth:`TlsSession.encrypt` turns a whole batch of pages into many 16 KiB records
in few C calls and hands back their ciphertext in one buffer; :meth:`TlsSession.feed`
takes whatever one large receive brought (many records) and :meth:`TlsSession.read_into`
decrypts every complete record straight into the caller's buffer.

Two drivers: the trio ``TlsStream`` (transports/tls.py) and the thread driver
``TlsThreadStream`` (transports/tls_thread.py, the OS-thread fast paths), both over these
steps. A session may be driven from two threads at once, one receiving and one sending
(a postcopy listener thread reading the main stream while the fault thread writes page
requests on its return path): every step takes the session's lock around its ssl calls
(OpenSSL's SSL object is not thread-safe; ssl releases the GIL in the crypto). One
receiver at a time and one sender at a time are the drivers' business, and so is the
order of ciphertext: a sender writes what :meth:`TlsSession.encrypt` returned before
another sender encrypts.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator, Sequence

from trimig.kernel.iov import Buffer, GatherCopy, GatherItem, IoVector

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

    __slots__ = ("_incoming", "_lock", "_outgoing", "ended", "ssl_object")

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
        self._lock = threading.Lock()

    def handshake_step(self) -> bool:
        """Advance the handshake with what was fed; True once it is complete."""
        try:
            with self._lock:
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
        with self._lock:
            return self._outgoing.read()

    def encrypt_items(
        self, items: Sequence[GatherItem], staging: memoryview
    ) -> Iterator[list[bytes]]:
        """:meth:`encrypt` of buffers and IoVectors alike: the ciphertext, a list of pieces
        at a time, to send in order before the next is taken. Pages as iovec arrays are
        gathered by the kernel into ``staging`` (WRITE_CHUNK bytes or so) one buffer at a
        time (a memoryview per page costs about twice as much)."""
        if not any(isinstance(item, IoVector) for item in items):
            yield self.encrypt(items)  # type: ignore[arg-type]
            return
        gather = GatherCopy(items)
        while gather.remaining:
            count = gather.copy_into(staging)
            yield self.encrypt([staging[:count]])

    def encrypt(self, buffers: Sequence[Buffer], *, limit: int = WRITE_CHUNK) -> list[bytes]:
        """Encrypt every byte of ``buffers`` in order; the ciphertext, in pieces of about
        ``limit`` bytes (with any output already pending first). Small buffers are joined
        (a record per 4 KiB page would cost a call and 22 bytes each); large ones are
        encrypted where they lie."""
        with self._lock:
            return self._encrypt(buffers, limit)

    def _encrypt(self, buffers: Sequence[Buffer], limit: int) -> list[bytes]:
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
        with self._lock:
            if memoryview(ciphertext).nbytes:
                self._incoming.write(ciphertext)
            else:
                self._incoming.write_eof()

    def read_into(self, buffer: memoryview) -> int | None:
        """Decrypt the complete records fed so far into ``buffer`` (non-empty): the count
        (at least one), 0 once the peer ended the session, or None when more ciphertext
        is needed. An end without close_notify counts as an end (the migration stream has
        its own end markers, and QEMU tolerates it)."""
        return self.readv_into([buffer])

    def readv_into(self, buffers: Sequence[memoryview]) -> int | None:
        """:meth:`read_into` scattering the plaintext over ``buffers`` in order (a readv:
        records' words and pages into their own arrays)."""
        have = 0
        read = self.ssl_object.read
        with self._lock:
            for buffer in buffers:
                room, filled = buffer.nbytes, 0
                while filled < room and not self.ended:
                    try:
                        count = int(read(room - filled, buffer[filled:]))  # given a buffer
                    except ssl.SSLWantReadError:
                        break
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        count = 0
                    if not count:
                        self.ended = True
                        break
                    filled += count
                have += filled
                if filled < room:
                    break
        if have:
            return have
        return 0 if self.ended else None

    def close_notify(self) -> bytes:
        """The close_notify alert to send (empty if the session cannot send one)."""
        with self._lock:
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
