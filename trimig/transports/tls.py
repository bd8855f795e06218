"""TLS over any two-way stream transport: QEMU's ``tls-creds-x509`` credentials, the
``tls-authz`` allow-list, and the stream and listener wrappers ``connect``/``listen`` use.

Every migration channel is opened by ``transports.connect`` and accepted by a listener
from ``transports.listen``; given ``tls=`` they wrap the stream here (:func:`tls_client`,
:class:`TlsListener`), so the main channel (and the return path on it), the postcopy
preempt channel and any later channel (multifd, recovery) are encrypted and
authenticated alike. The handshake is finished, within ``TLS_HANDSHAKE_TIMEOUT``, before
``connect``/``accept`` return: the first application bytes are the migration stream's.

A refusal raises :class:`TlsError` naming the reason: the peer's certificate is signed by
a foreign CA, not valid for the host name, expired; the peer does not speak TLS; the
source's certificate subject is not on the allow-list. A failed handshake sends its alert,
so the other side names the reason too. The allow-list is checked once the handshake is
complete, before the destination sends its TLS 1.3 session tickets; a TLS 1.3 source waits
for one (TLS_ACCEPT_TIMEOUT) before it calls the channel up, so a refused source learns it
in ``connect``, not from a later send that finds the connection closed.

The handshake and the records are stdlib ssl's ``SSLObject`` over memory BIOs
(:mod:`trimig.transports.tls_session`) driven here from trio; trio's ``SSLStream`` costs
a scheduler round per 16 KiB record, which made TLS 4x slower than plaintext.

:class:`TlsStream` has no ``fileno`` (its fd carries ciphertext): the OS-thread fast paths
read and write it through :meth:`TlsStream.thread_stream`, the thread driver of the same
session (:mod:`trimig.transports.tls_thread`), which encrypts and decrypts in the thread.

The end of a session: ``send_eof`` half-closes the transport after the last record (TLS
has no half close) and a session that ends without close_notify counts as an EOF
(trio's ``https_compatible``), as QEMU tolerates from older sources. A cut is still
found: the migration stream and the return path have their own end markers (EOF, SHUT).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Sequence

import trio

from trimig.errors import ConfigError, TransportError
from trimig.kernel.iov import GatherItem
from trimig.threads import ThreadStream, thread_stream
from trimig.transports.base import (
    ByteStream,
    Listener,
    ListenerBase,
    RegionRegistry,
    set_channel_timeout,
    shutdown_stream,
)
from trimig.transports.tls_credentials import (
    TlsError,
    TlsSettings,
    describe_failure,
    subject_name,
)
from trimig.transports.tls_session import RECORD, WRITE_CHUNK, TlsSession
from trimig.transports.tls_thread import TlsThreadStream
from trimig.transports.uri import Address, TcpAddress

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a handshake may take before the connection is refused."""
TLS_CLOSE_TIMEOUT = 2.0
"""Seconds aclose() waits to send close_notify before closing the transport anyway."""
TLS_ACCEPT_TIMEOUT = 2.0
"""Seconds a TLS 1.3 source waits after its handshake for the destination's session
ticket, the sign that its certificate was accepted (a destination that sends no tickets
costs this much once per channel)."""
#: Most ciphertext bytes one receive takes from the transport (many records).
RAW_RECEIVE = 1 << 20
#: What a refusal after the handshake most likely means.
REFUSED_HINT = "is this side's certificate subject on its tls-authz allow-list?"


class TlsStream:
    """A ByteStream whose bytes travel TLS-encrypted over another ByteStream.

    Made by :func:`tls_client` or :class:`TlsListener`, handshake done: a
    :class:`~trimig.transports.tls_session.TlsSession` driven from trio. A send encrypts
    the whole batch (many records per C call) and sends the ciphertext in large pieces; a
    receive takes up to RAW_RECEIVE bytes of ciphertext at a time and decrypts every whole
    record straight into the caller's buffer. ``peer_subject`` is the peer certificate's
    subject (empty when the peer sent none). A client stream whose destination has not
    shown that it accepted this side (no session ticket, no byte) names a likely refusal
    of its certificate when the session ends or breaks.
    """

    has_return_path = True
    regions: RegionRegistry | None = None

    def __init__(
        self, session: TlsSession, inner: ByteStream, *, peer: str, accepted: bool = True
    ) -> None:
        self._session = session
        self._inner = inner
        self._peer = peer
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._raw = bytearray(RAW_RECEIVE)
        self._staging: memoryview | None = None  # pages gathered for encryption
        self._held = b""  # plaintext received while waiting for a session ticket
        self._eof_sent = False
        self._closed = False
        self._accepted = accepted
        certificate = session.ssl_object.getpeercert()
        self.peer_subject = subject_name(certificate) if certificate else ""

    @property
    def transport(self) -> str:
        return self._inner.transport

    def set_channel_timeout(self, seconds: float | None) -> None:
        """Dead-peer detection (x-channel-timeout) of the transport underneath."""
        set_channel_timeout(self._inner, seconds)

    def shutdown(self) -> None:
        """Shut the transport underneath down (migrate-pause): readers see the end,
        writers fail."""
        shutdown_stream(self._inner)

    def thread_stream(self) -> TlsThreadStream | None:
        """The thread driver of this stream's session (``threads.thread_stream``): None
        when the transport underneath has no fd, or while plaintext received during
        :meth:`wait_accepted` waits for the trio reader."""
        raw = thread_stream(self._inner)
        if raw is None or type(raw) is not ThreadStream or self._held:
            return None
        return TlsThreadStream(self._session, raw.fd, peer=self._peer)

    @property
    def cipher(self) -> str:
        cipher = self._session.ssl_object.cipher()
        return f"{cipher[1]} {cipher[0]}" if cipher else ""

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if self._eof_sent:
            raise TransportError(f"sending on TLS to {self._peer} after send_eof()")
        async with self._send_lock:
            if self._staging is None:
                self._staging = memoryview(bytearray(WRITE_CHUNK))
            try:
                for pieces in self._session.encrypt_items(buffers, self._staging):
                    await self._send_pieces(pieces)
            except (TransportError, ssl.SSLError) as error:
                raise self._failure("sending", error) from error

    async def _send_pieces(self, pieces: list[bytes]) -> None:
        if not pieces:
            await trio.lowlevel.checkpoint()
        for piece in pieces:
            await self._inner.send_buffers([piece])

    async def receive_into(self, buffer: memoryview) -> int:
        view = memoryview(buffer).cast("B")
        if view.nbytes == 0:
            raise TransportError("receive_into needs a non-empty buffer (0 means EOF)")
        async with self._receive_lock:
            if self._held:
                count = min(len(self._held), view.nbytes)
                view[:count] = self._held[:count]
                self._held = self._held[count:]
                await trio.lowlevel.checkpoint()
                return count
            try:
                count = await self._receive(view) or 0  # (never None without ``until``)
            except (TransportError, ssl.SSLError) as error:
                raise self._failure("receiving", error) from error
        if count == 0 and not self._accepted:
            raise TlsError(
                f"{self._peer} ended the TLS session before sending anything: it refused "
                f"this connection ({REFUSED_HINT})"
            )
        self._accepted = True
        return count

    async def _receive(
        self, view: memoryview, *, until: Callable[[], bool] | None = None
    ) -> int | None:
        """Plaintext into ``view`` (0 at the end), receiving ciphertext as needed; None
        if ``until()`` becomes true first (checked after each receive: a session ticket)."""
        session = self._session
        received_any = False
        while True:
            count = session.read_into(view)
            if count is None and until is not None and until():
                return None
            if (
                session.output_pending
                and not session.ended  # (its alert about the end is not sent)
                and not self._eof_sent
                and not self._send_lock.locked()
            ):
                async with self._send_lock:  # a post-handshake answer (a key update)
                    await self._inner.send_buffers([session.take_output()])
            if count is not None:
                if not received_any:
                    await trio.lowlevel.checkpoint()
                return count
            received = await self._inner.receive_into(memoryview(self._raw))
            received_any = True
            session.feed(memoryview(self._raw)[:received])

    async def wait_accepted(self, timeout: float) -> None:
        """(Client, TLS 1.3.) Wait up to ``timeout`` seconds for the destination to show
        that it accepted this side's certificate: a session ticket (a TLS 1.3 server sends
        one once it has checked the client, and trimig's checks the allow-list first) or
        its first bytes. A destination that ends the session first refused this side; one
        that sends no tickets at all is trusted after ``timeout``."""
        session = self._session
        with trio.move_on_after(timeout):
            while not session.has_ticket():
                buffer = memoryview(bytearray(RECORD))
                try:
                    count = await self._receive(buffer, until=session.has_ticket)
                except (TransportError, ssl.SSLError) as error:
                    reason = describe_failure(error, self._peer, handshake=False)
                    if not isinstance(error, ssl.SSLError):  # no alert: guess
                        reason += f" (did it refuse this connection? {REFUSED_HINT})"
                    raise TlsError(
                        f"TLS with {self._peer} failed right after the handshake: {reason}"
                    ) from error
                if count is None:
                    break
                if count == 0:
                    raise TlsError(
                        f"{self._peer} ended the TLS session right after the handshake: it "
                        f"refused this connection ({REFUSED_HINT})"
                    )
                self._held += bytes(buffer[:count])
            self._accepted = True

    def _failure(self, action: str, error: BaseException) -> TransportError:
        if isinstance(error, TransportError) and not self._accepted:
            return TlsError(
                f"{action} on TLS to {self._peer} failed before it sent anything: {error} "
                f"(did it refuse this connection? {REFUSED_HINT})"
            )
        reason = describe_failure(error, self._peer, handshake=False)
        return TlsError(f"{action} on TLS to {self._peer} failed: {reason}")

    async def send_eof(self) -> None:
        async with self._send_lock:
            if not self._eof_sent:
                self._eof_sent = True
                await self._inner.send_eof()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self._eof_sent and not self._send_lock.locked():
                with trio.move_on_after(TLS_CLOSE_TIMEOUT):
                    alert = self._session.close_notify()
                    if alert:
                        await self._inner.send_buffers([alert])
        except TransportError:
            pass  # the transport is gone already: nothing to say goodbye on
        finally:
            await self._inner.aclose()


def check_client_settings(settings: TlsSettings, address: Address) -> None:
    """Refuse, before connecting, what a source's TLS cannot do: server credentials, a
    transport TLS cannot protect, no host name to check the certificate against."""
    check_tls_transport(address)
    if settings.credentials.endpoint != "client":
        raise ConfigError(
            f"tls-creds {settings.credentials.id!r} has endpoint 'server'; the source of a "
            "migration needs credentials with endpoint 'client'"
        )
    _client_hostname(settings, address)


def _client_hostname(settings: TlsSettings, address: Address) -> str | None:
    if settings.hostname:
        return settings.hostname
    if not settings.credentials.verify_peer:
        return None
    if isinstance(address, TcpAddress) and address.host:
        return address.host
    raise ConfigError(
        f"tls-hostname must be set to migrate over TLS to {address.uri}: the URI has no host "
        "name to check the destination's certificate against"
    )


def check_tls_transport(address: Address) -> None:
    """Refuse TLS on a transport it cannot protect: exec (one-way, no handshake), the
    RDMA-shaped one (pages written one-sided into the peer's memory) and file."""
    kind = address.uri.split(":", 1)[0]
    if kind in ("exec", "rdma", "file"):
        why = {
            "exec": "it is one-way, so no TLS handshake can take place",
            "rdma": "its pages are written one-sided into the peer's memory, outside any "
            "TLS session",
            "file": "a file has no peer to hold a TLS handshake with (as QEMU, which refuses "
            "TLS with mapped-ram)",
        }[kind]
        raise ConfigError(
            f"TLS (tls-creds) is not available on {kind}: transports: {why}; use tcp: or unix:"
        )


async def tls_client(stream: ByteStream, settings: TlsSettings, address: Address) -> TlsStream:
    """Run the client handshake over ``stream`` (closed on failure) and, on TLS 1.3, wait
    for the destination to accept this side (:meth:`TlsStream.wait_accepted`); a TlsStream
    to use."""
    credentials = settings.credentials
    try:
        check_client_settings(settings, address)
        hostname = _client_hostname(settings, address)
        session = TlsSession(credentials.context, server_side=False, server_hostname=hostname)
        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            await _handshake(session, stream, "the destination", address)
        tls = TlsStream(session, stream, peer="the destination", accepted=False)
        if session.ssl_object.version() == "TLSv1.3":
            await tls.wait_accepted(TLS_ACCEPT_TIMEOUT)
        return tls
    except trio.TooSlowError:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise _too_slow("the destination", address) from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


def _too_slow(peer: str, address: Address) -> TlsError:
    return TlsError(
        f"TLS handshake with {peer} on {address.uri} took more than "
        f"{TLS_HANDSHAKE_TIMEOUT:g} s (a plaintext peer waiting for us to speak first?)"
    )


async def _handshake(
    session: TlsSession,
    stream: ByteStream,
    peer: str,
    address: Address,
    *,
    before_last_flight: Callable[[], None] | None = None,
) -> None:
    """Drive ``session``'s handshake over ``stream``. ``before_last_flight`` runs once the
    handshake is complete, before its last messages (a TLS 1.3 server's session tickets)
    are sent; what it raises refuses the peer. A failed handshake sends its alert (the
    peer learns why) and raises TlsError naming the reason."""
    raw = memoryview(bytearray(RECORD))
    try:
        while True:
            try:
                done = session.handshake_step()
            except ssl.SSLError:
                with trio.move_on_after(TLS_CLOSE_TIMEOUT), contextlib.suppress(TransportError):
                    if session.output_pending:  # the alert
                        await stream.send_buffers([session.take_output()])
                raise
            if done and before_last_flight is not None:
                before_last_flight()
            if session.output_pending:
                await stream.send_buffers([session.take_output()])
            if done:
                return
            session.feed(raw[: await stream.receive_into(raw)])
    except (ssl.SSLError, TransportError) as error:
        if isinstance(error, TlsError):
            raise
        raise TlsError(
            f"TLS handshake with {peer} on {address.uri} failed: {describe_failure(error, peer)}"
        ) from error


class TlsListener(ListenerBase):
    """A Listener whose accept() returns a TlsStream once the source is authenticated and
    on the allow-list (checked before the session tickets go out: a TLS 1.3 source waits
    for one to know it was let in)."""

    def __init__(self, inner: Listener, settings: TlsSettings) -> None:
        credentials = settings.credentials
        if credentials.endpoint != "server":
            raise ConfigError(
                f"tls-creds {credentials.id!r} has endpoint 'client'; the destination of a "
                "migration needs credentials with endpoint 'server'"
            )
        self._inner = inner
        self._settings = settings

    @property
    def address(self) -> Address:
        return self._inner.address

    async def accept(self) -> ByteStream:
        stream = await self._inner.accept()
        try:
            session = TlsSession(
                self._settings.credentials.context, server_side=True, server_hostname=None
            )
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await _handshake(
                    session,
                    stream,
                    "the source",
                    self.address,
                    before_last_flight=lambda: self._authorize(session),
                )
            return TlsStream(session, stream, peer="the source")
        except trio.TooSlowError:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise _too_slow("the source", self.address) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    def _authorize(self, session: TlsSession) -> None:
        lookup = self._settings.authz
        if lookup is None:
            return
        authz = lookup()
        certificate = session.ssl_object.getpeercert()
        subject = subject_name(certificate) if certificate else ""
        if not authz.allows(subject):
            raise TlsError(
                f"TLS on {self.address.uri}: the source's certificate subject "
                f"{subject or '(none)'!r} is not on the allow-list {authz.id!r} (tls-authz)"
            )

    async def aclose(self) -> None:
        await self._inner.aclose()
