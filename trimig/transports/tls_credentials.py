"""QEMU's TLS objects and what a refusal means: ``tls-creds-x509`` credentials (QEMU's
file names in one directory), the ``tls-authz`` allow-list, the settings ``connect`` and
``listen`` take, and the reason a handshake failed, in words."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

import attrs

from trimig.errors import ConfigError, TransportError

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


#: What the alert a peer sends about our certificate means.
ALERT_MEANINGS = {
    "UNKNOWN_CA": "our certificate: it is not signed by a CA it trusts",
    "CERTIFICATE_EXPIRED": "our certificate: it has expired",
    "BAD_CERTIFICATE": "our certificate as bad",
    "CERTIFICATE_REQUIRED": "the session: it needs a certificate from us",
    "ACCESS_DENIED": "our certificate: access denied",
}


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
            alert = reason.lower().replace("_", " ")
            why = ALERT_MEANINGS.get(reason.rsplit("_ALERT_", 1)[-1])
            return (
                f"{peer} refused {why} ({alert})"
                if why
                else f"{peer} refused the TLS session ({alert})"
            )
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
