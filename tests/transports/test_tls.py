"""TLS refusals at the transport: each is early and names its reason (the end-to-end runs
through the engines are in tests/test_tls_e2e.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trustme
from tls_certs import CLIENT_NAME, write_creds

from trimig._trio import open_nursery
from trimig.errors import ConfigError, TransportError
from trimig.threads import thread_stream
from trimig.transports import ByteStream, connect, listen
from trimig.transports.tls import TLS_ACCEPT_TIMEOUT
from trimig.transports.tls_credentials import (
    AuthzList,
    AuthzRule,
    TlsCredentials,
    TlsError,
    TlsSettings,
    subject_name,
)
from trimig.transports.tls_thread import TlsThreadStream


def creds(directory: str, endpoint: str) -> TlsCredentials:
    return TlsCredentials(endpoint, directory, endpoint=endpoint)


@asynccontextmanager
async def attempt(
    client: TlsSettings | None, server: TlsSettings | None
) -> AsyncIterator[tuple[list[BaseException], list[ByteStream]]]:
    """Listen (tls=server) and connect (tls=client); yields the accept side's error or
    stream, after the connect succeeded (its error propagates)."""
    errors: list[BaseException] = []
    streams: list[ByteStream] = []
    async with await listen("tcp:127.0.0.1:0", tls=server) as listener:

        async def accept() -> None:
            try:
                streams.append(await listener.accept())
            except TransportError as error:
                errors.append(error)

        async with open_nursery() as nursery:
            nursery.start_soon(accept)
            try:
                stream = await connect(listener.address, tls=client)
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            try:
                with trio.fail_after(15):
                    while not errors and not streams:
                        await trio.sleep(0.01)
                yield errors, [stream, *streams]
            finally:
                for each in (stream, *streams):
                    await each.aclose()


@pytest.fixture
def good(tmp_path: object) -> str:
    return write_creds(f"{tmp_path}/good", trustme.CA())


async def test_a_session_moves_bytes_and_offers_its_thread_driver(good: str) -> None:
    client = TlsSettings(creds(good, "client"))  # the tcp host 127.0.0.1 is in the cert
    async with attempt(client, TlsSettings(creds(good, "server"))) as (errors, streams):
        assert not errors
        source, destination = streams
        await source.send_buffers([b"QEVM", memoryview(b"\0\0\0\3")])
        data = bytearray(8)
        assert await destination.receive_into(memoryview(data)) >= 1
        assert not hasattr(source, "fileno")  # its fd carries ciphertext
        assert isinstance(thread_stream(source), TlsThreadStream)
        assert isinstance(thread_stream(destination), TlsThreadStream)
        assert destination.peer_subject.startswith(f"CN={CLIENT_NAME}")


async def test_the_source_calls_the_channel_up_once_the_ticket_arrives(good: str) -> None:
    """A TLS 1.3 source waits for the destination's session ticket (its sign that the
    allow-list let it in): on arrival, not for the whole TLS_ACCEPT_TIMEOUT."""
    start = trio.current_time()
    async with attempt(TlsSettings(creds(good, "client")), TlsSettings(creds(good, "server"))):
        assert trio.current_time() - start < TLS_ACCEPT_TIMEOUT


async def test_foreign_ca_is_refused(tmp_path: object, good: str) -> None:
    foreign = write_creds(f"{tmp_path}/foreign", trustme.CA())
    with pytest.raises(TlsError, match=r"not signed by our CA .a foreign CA"):
        async with attempt(
            TlsSettings(creds(good, "client")), TlsSettings(creds(foreign, "server"))
        ):
            pass


async def test_hostname_mismatch_is_refused(good: str) -> None:
    client = TlsSettings(creds(good, "client"), hostname="elsewhere.example")
    with pytest.raises(TlsError, match=r"does not match the host name.*elsewhere.example"):
        async with attempt(client, TlsSettings(creds(good, "server"))):
            pass


async def test_expired_certificate_is_refused(tmp_path: object) -> None:
    ca = trustme.CA()
    good = write_creds(f"{tmp_path}/good", ca)
    expired = write_creds(f"{tmp_path}/expired", ca, expired=True)
    with pytest.raises(TlsError, match=r"certificate has expired"):
        async with attempt(
            TlsSettings(creds(good, "client")), TlsSettings(creds(expired, "server"))
        ):
            pass


async def test_a_source_certificate_from_a_foreign_ca_is_refused(tmp_path: object) -> None:
    ca = trustme.CA()
    server_dir = write_creds(f"{tmp_path}/server", ca)
    client_dir = write_creds(f"{tmp_path}/client", ca, client_ca=trustme.CA())
    client = TlsSettings(creds(client_dir, "client"))
    server = TlsSettings(creds(server_dir, "server"))
    async with await listen("tcp:127.0.0.1:0", tls=server) as listener:
        with pytest.raises(TlsError, match=r"refused our certificate: it is not signed by a CA"):
            async with open_nursery() as nursery:
                nursery.start_soon(partial(connect, listener.address, tls=client))
                with trio.fail_after(10), pytest.raises(TlsError) as refused:
                    await listener.accept()
    assert "the source's certificate is not signed by our CA" in str(refused.value)


async def test_plaintext_source_is_refused(good: str) -> None:
    server = TlsSettings(creds(good, "server"))
    async with await listen("tcp:127.0.0.1:0", tls=server) as listener:
        source = await connect(listener.address)
        try:
            await source.send_buffers([b"QEVM\0\0\0\3" * 64])  # the stream's header
            with trio.fail_after(5), pytest.raises(TlsError) as refused:
                await listener.accept()
        finally:
            await source.aclose()
    assert "the source does not speak TLS (a plaintext peer" in str(refused.value)


async def test_plaintext_destination_is_refused(good: str) -> None:
    async with await listen("tcp:127.0.0.1:0") as listener, open_nursery() as nursery:

        async def plaintext_destination() -> None:
            stream = await listener.accept()
            await stream.receive_into(memoryview(bytearray(64)))
            await stream.send_buffers([b"\x00\x00\x00\x01" * 16])  # a return-path message
            await trio.sleep(1)
            await stream.aclose()

        nursery.start_soon(plaintext_destination)
        with pytest.raises(TlsError, match=r"does not speak TLS"):
            await connect(listener.address, tls=TlsSettings(creds(good, "client")))


async def test_a_source_not_on_the_allow_list_is_refused(good: str) -> None:
    allow = AuthzList("auth0", (AuthzRule("CN=someone.else"),))
    server = TlsSettings(creds(good, "server"), authz=lambda: allow)
    client = TlsSettings(creds(good, "client"))
    async with await listen("tcp:127.0.0.1:0", tls=server) as listener:
        # TLS 1.3: the source's handshake is done before the destination checks it; the
        # source waits for the session ticket it sends only to a source it lets in.
        with pytest.raises(TlsError, match=r"refused this connection.*tls-authz allow-list"):
            async with open_nursery() as nursery:
                nursery.start_soon(partial(connect, listener.address, tls=client))
                with trio.fail_after(10), pytest.raises(TlsError) as refused:
                    await listener.accept()
    assert f"subject 'CN={CLIENT_NAME}" in str(refused.value)
    assert "is not on the allow-list 'auth0' (tls-authz)" in str(refused.value)


async def test_a_source_on_the_allow_list_is_let_in(good: str) -> None:
    allow = AuthzList("auth0", (AuthzRule(f"CN={CLIENT_NAME},*", format="glob"),))
    server = TlsSettings(creds(good, "server"), authz=lambda: allow)
    async with attempt(TlsSettings(creds(good, "client")), server) as (errors, streams):
        assert not errors and len(streams) == 2


async def test_tls_is_refused_on_transports_it_cannot_protect(good: str) -> None:
    for uri in ("exec:cat", "rdma:/tmp/x.sock", "file:/tmp/x.img"):
        with pytest.raises(ConfigError, match=r"TLS .tls-creds. is not available"):
            await connect(uri, tls=TlsSettings(creds(good, "client")))


async def test_unix_needs_a_host_name(good: str) -> None:
    with pytest.raises(ConfigError, match=r"tls-hostname must be set"):
        await connect("unix:/tmp/nowhere.sock", tls=TlsSettings(creds(good, "client")))


def test_missing_files_are_named(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match=r"ca-cert.pem does not exist"):
        TlsCredentials("t", str(tmp_path), endpoint="server")


def test_subject_name_is_rfc4514_most_specific_first() -> None:
    certificate = {
        "subject": (
            (("countryName", "GB"),),
            (("organizationName", "Example, Ltd"),),
            (("commonName", "src.example.com"),),
        )
    }
    assert subject_name(certificate) == "CN=src.example.com,O=Example\\, Ltd,C=GB"
