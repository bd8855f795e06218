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
source's certificate subject is not on the allow-list.

:class:`TlsStream` has no ``fileno``: the OS-thread fast paths (``threads.stream_fd``)
serve only streams whose fd carries their bytes raw, so they use its trio methods.

The end of a session: ``send_eof`` half-closes the transport after the last record (TLS
has no half close) and a session that ends without close_notify counts as an EOF
(trio's ``https_compatible``), as QEMU tolerates from older sources. A cut is still
found: the migration stream and the return path have their own end markers (EOF, SHUT).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from trimig.errors import ConfigError, TransportError
from trimig.kernel.iov import GatherItem, flatten
from trimig.transports.base import (
    ByteStream,
    Listener,
    ListenerBase,
    RegionRegistry,
    set_channel_timeout,
)
from trimig.transports.uri import Address, TcpAddress

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a handshake may take before the connection is refused."""
TLS_CLOSE_TIMEOUT = 2.0
"""Seconds aclose() waits to send close_notify before closing the transport anyway."""
#: Bytes joined into one TLS write (records are 16 KiB; fewer, larger writes cost less).
SEND_CHUNK = 1 << 20
RECEIVE_SIZE = 1 << 16
#: Most plaintext bytes one receive_into asks the session for: ssl's read allocates what
#: it is asked for, whatever a record holds (16 KiB), so a large buffer would cost a large
#: allocation per record.
RECEIVE_MAX = 1 << 14

#: QEMU's file names in a ``tls-creds-x509`` directory.
CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

ENDPOINTS = ("client", "server")


class TlsError(TransportError):
    """A TLS handshake or session was refused or failed; the message names the reason."""


@attrs.frozen
class TlsCredentials:
    """A ``tls-creds-x509`` object: QEMU's files in ``directory`` for one ``endpoint``.

    The source uses client credentials, the destination server credentials. The files are
    read when the object is made, so a missing or bad file is an error of object-add.
    """

    id: str
    directory: str
    endpoint: str = "client"
    verify_peer: bool = True
    context: ssl.SSLContext = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(
                f"tls-creds-x509 {self.id!r}: endpoint must be 'client' or 'server', "
                f"not {self.endpoint!r}"
            )
        object.__setattr__(self, "context", self._load())

    def _path(self, name: str, *, required: bool) -> str | None:
        path = os.path.join(self.directory, name)
        if os.path.exists(path):
            return path
        if required:
            raise ConfigError(
                f"tls-creds-x509 {self.id!r} ({self.endpoint}): {path} does not exist "
                f"(the directory must hold QEMU's file names: {CA_CERT}, "
                f"{SERVER_CERT}/{SERVER_KEY} or {CLIENT_CERT}/{CLIENT_KEY})"
            )
        return None

    def _load(self) -> ssl.SSLContext:
        if not os.path.isdir(self.directory):
            raise ConfigError(f"tls-creds-x509 {self.id!r}: {self.directory!r} is not a directory")
        server = self.endpoint == "server"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = self._path(CA_CERT, required=self.verify_peer)
        cert = self._path(SERVER_CERT if server else CLIENT_CERT, required=server)
        key = self._path(SERVER_KEY if server else CLIENT_KEY, required=server or cert is not None)
        try:
            if ca is not None:
                context.load_verify_locations(ca)
            if cert is not None:
                context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigError(
                f"tls-creds-x509 {self.id!r}: cannot load the files in {self.directory}: {error}"
            ) from None
        if self.verify_peer:
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@attrs.frozen
class AuthzRule:
    match: str
    policy: str = "allow"
    format: str = "exact"

    def matches(self, subject: str) -> bool:
        if self.format == "glob":
            import fnmatch

            return fnmatch.fnmatchcase(subject, self.match)
        return subject == self.match


@attrs.frozen
class AuthzList:
    """QEMU's ``authz-list`` (``authz-simple`` is one allow rule, default deny): the first
    rule that matches the client certificate's subject decides, else ``policy``."""

    id: str
    rules: tuple[AuthzRule, ...] = ()
    policy: str = "deny"

    def allows(self, subject: str) -> bool:
        for rule in self.rules:
            if rule.matches(subject):
                return rule.policy == "allow"
        return self.policy == "allow"


@attrs.frozen
class TlsSettings:
    """What ``connect``/``listen`` need to wrap a channel: the credentials, the host name
    the destination's certificate must be valid for (client; empty: the tcp host), and a
    lookup of the allow-list (server; resolved at each connection, as QEMU does: None
    means no check, a lookup that raises denies)."""

    credentials: TlsCredentials
    hostname: str = ""
    authz: Callable[[], AuthzList] | None = None


def subject_name(certificate: dict[str, Any]) -> str:
    """The certificate's subject as an RFC 4514 distinguished name ("CN=...,O=...", the
    most specific part first), the form QEMU's authz rules match."""
    short = {
        "commonName": "CN",
        "organizationName": "O",
        "organizationalUnitName": "OU",
        "countryName": "C",
        "stateOrProvinceName": "ST",
        "localityName": "L",
        "emailAddress": "EMAIL",
        "domainComponent": "DC",
    }
    parts = []
    for rdn in reversed(certificate.get("subject", ())):
        for name, value in rdn:
            escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in str(value))
            parts.append(f"{short.get(name, name)}={escaped}")
    return ",".join(parts)


def describe_failure(error: BaseException, peer: str, *, handshake: bool = True) -> str:
    """Why a handshake or session with ``peer`` ("the destination", "the source") failed."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError | TransportError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, TransportError):
        return str(cause)
    if isinstance(cause, ssl.SSLCertVerificationError):
        code, message = cause.verify_code, cause.verify_message
        if code in (2, 19, 20, 21):
            return f"{peer}'s certificate is not signed by our CA (a foreign CA: {message})"
        if code == 62:
            return (
                f"{peer}'s certificate does not match the host name ({message}; set tls-hostname?)"
            )
        if code == 10:
            return f"{peer}'s certificate has expired"
        if code == 9:
            return f"{peer}'s certificate is not valid yet"
        return f"{peer}'s certificate was refused: {message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        if reason in (
            "WRONG_VERSION_NUMBER",
            "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG",
            "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL",
            "RECORD_LENGTH_MISMATCH",
        ):
            return f"{peer} does not speak TLS (a plaintext peer: is tls-creds set on both sides?)"
        if "ALERT" in reason:
            return f"{peer} refused the TLS session ({reason.lower().replace('_', ' ')})"
        if isinstance(cause, ssl.SSLEOFError):
            return _closed(peer, handshake)
        return f"TLS with {peer} failed: {cause.reason or cause}"
    return _closed(peer, handshake)


def _closed(peer: str, handshake: bool) -> str:
    if not handshake:
        return f"{peer} closed the connection"
    return (
        f"{peer} closed the connection during the TLS handshake (a plaintext peer, or one "
        "that refused our certificate)"
    )


class _Transport(trio.abc.HalfCloseableStream):
    """A ByteStream as the trio Stream that SSLStream encrypts over."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_buffers([data])

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buffer = bytearray(max_bytes or RECEIVE_SIZE)
        count = await self.inner.receive_into(memoryview(buffer))
        return bytes(buffer[:count])

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class TlsStream:
    """A ByteStream whose bytes travel TLS-encrypted over another ByteStream.

    Made by :func:`tls_client` or :class:`TlsListener`, handshake done. ``peer_subject``
    is the peer certificate's subject (empty when the peer sent none). A client stream
    (``refused_hint``) that ends before the destination sent a byte says it was refused
    after the handshake, the way a destination ends a client not on its allow-list.
    """

    def __init__(self, ssl_stream: trio.SSLStream, transport: _Transport, *, peer: str) -> None:
        self._ssl = ssl_stream
        self._inner = transport.inner
        self._peer = peer
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._received_any = False
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self.refused_hint = False
        certificate = ssl_stream.getpeercert()
        self.peer_subject = subject_name(certificate) if certificate else ""

    @property
    def transport(self) -> str:
        return self._inner.transport

    @property
    def has_return_path(self) -> bool:
        return True

    @property
    def regions(self) -> RegionRegistry | None:
        return None

    def set_channel_timeout(self, seconds: float | None) -> None:
        """Dead-peer detection (x-channel-timeout) of the transport underneath."""
        set_channel_timeout(self._inner, seconds)

    @property
    def cipher(self) -> str:
        cipher = self._ssl.cipher()
        return f"{cipher[1]} {cipher[0]}" if cipher else ""

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if self._eof_sent:
            raise TransportError(f"sending on TLS to {self._peer} after send_eof()")
        views = flatten(buffers)
        async with self._send_lock:
            chunk: list[Any] = []
            size = 0
            for view in views:
                chunk.append(view)
                size += (
                    len(view) if isinstance(view, bytes | bytearray) else memoryview(view).nbytes
                )
                if size >= SEND_CHUNK:
                    await self._send(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                await self._send(b"".join(chunk))
            elif not views:
                await trio.lowlevel.checkpoint()

    async def _send(self, data: bytes) -> None:
        try:
            await self._ssl.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as error:
            raise self._failure("sending", error) from error

    async def receive_into(self, buffer: memoryview) -> int:
        if memoryview(buffer).nbytes == 0:
            raise TransportError("receive_into needs a non-empty buffer (0 means EOF)")
        async with self._receive_lock:
            if self._eof_received:
                await trio.lowlevel.checkpoint()
                return 0
            try:
                data = await self._ssl.receive_some(min(memoryview(buffer).nbytes, RECEIVE_MAX))
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as error:
                raise self._failure("receiving", error) from error
        if not data:
            self._eof_received = True
            if self.refused_hint and not self._received_any:
                raise TlsError(
                    f"{self._peer} ended the TLS session before sending anything: it refused "
                    "this connection (is this side's certificate subject on its tls-authz "
                    "allow-list?)"
                )
            return 0
        self._received_any = True
        count = len(data)
        buffer[:count] = data
        return count + self._drain(memoryview(buffer)[count:])

    def _drain(self, rest: memoryview) -> int:
        """Copy the records already decrypted or complete in the session's incoming buffer
        into ``rest`` without waiting (one record per SSLStream call costs more than the
        decryption). Stops at the first record not yet whole; errors are left to the next
        receive. Uses trio's SSLObject, as SSLStream's own read would, under the receive
        lock (no other receive runs)."""
        ssl_object = getattr(self._ssl, "_ssl_object", None)
        if not isinstance(ssl_object, ssl.SSLObject):
            return 0
        have = 0
        while rest.nbytes - have >= RECEIVE_MAX:
            try:
                chunk = ssl_object.read(RECEIVE_MAX)
            except ssl.SSLError:  # SSLWantReadError: no whole record left
                break
            if not chunk:
                break
            rest[have : have + len(chunk)] = chunk
            have += len(chunk)
        return have

    def _failure(self, action: str, error: BaseException) -> TransportError:
        if isinstance(error, trio.ClosedResourceError):
            return TransportError(f"{action} on TLS to {self._peer} failed: closed locally")
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
            with trio.move_on_after(TLS_CLOSE_TIMEOUT):
                await self._ssl.aclose()
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
    """Run the client handshake over ``stream`` (closed on failure); a TlsStream to use."""
    credentials = settings.credentials
    try:
        check_client_settings(settings, address)
        hostname = _client_hostname(settings, address)
        transport = _Transport(stream)
        ssl_stream = trio.SSLStream(
            transport, credentials.context, server_hostname=hostname, https_compatible=True
        )
        await _handshake(ssl_stream, "the destination", address)
        tls = TlsStream(ssl_stream, transport, peer="the destination")
        tls.refused_hint = True
        return tls
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


async def _handshake(ssl_stream: trio.SSLStream, peer: str, address: Address) -> None:
    try:
        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        raise TlsError(
            f"TLS handshake with {peer} on {address.uri} took more than "
            f"{TLS_HANDSHAKE_TIMEOUT:g} s (a plaintext peer waiting for us to speak first?)"
        ) from None
    except (trio.BrokenResourceError, ssl.SSLError, TransportError) as error:
        raise TlsError(
            f"TLS handshake with {peer} on {address.uri} failed: {describe_failure(error, peer)}"
        ) from error


class TlsListener(ListenerBase):
    """A Listener whose accept() returns a TlsStream once the source is authenticated."""

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
            transport = _Transport(stream)
            ssl_stream = trio.SSLStream(
                transport,
                self._settings.credentials.context,
                server_side=True,
                https_compatible=True,
            )
            await _handshake(ssl_stream, "the source", self.address)
            tls = TlsStream(ssl_stream, transport, peer="the source")
            self._authorize(tls)
            return tls
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    def _authorize(self, tls: TlsStream) -> None:
        lookup = self._settings.authz
        if lookup is None:
            return
        authz = lookup()
        if not authz.allows(tls.peer_subject):
            raise TlsError(
                f"TLS on {self.address.uri}: the source's certificate subject "
                f"{tls.peer_subject or '(none)'!r} is not on the allow-list {authz.id!r} "
                "(tls-authz)"
            )

    async def aclose(self) -> None:
        await self._inner.aclose()
