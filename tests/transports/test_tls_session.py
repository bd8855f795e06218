"""The sans-io TLS session on its own: two sessions handshake in memory, and any batch of
buffers comes out of the other end whole, in order, whatever the ciphertext's cuts and the
reader's buffer sizes."""

from __future__ import annotations

import os
import tempfile

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_certs import write_creds

from trimig.transports.tls_credentials import TlsCredentials
from trimig.transports.tls_session import RECORD, TlsSession


@pytest.fixture(scope="module")
def contexts() -> tuple[TlsCredentials, TlsCredentials]:
    with tempfile.TemporaryDirectory() as directory:
        creds = write_creds(f"{directory}/c", trustme.CA())
        return (
            TlsCredentials("c", creds, endpoint="client"),
            TlsCredentials("s", creds, endpoint="server"),
        )


def handshake(contexts: tuple[TlsCredentials, TlsCredentials]) -> tuple[TlsSession, TlsSession]:
    client_creds, server_creds = contexts
    client = TlsSession(client_creds.context, server_side=False, server_hostname="localhost")
    server = TlsSession(server_creds.context, server_side=True, server_hostname=None)
    done = [False, False]
    for _ in range(10):
        done[0] = done[0] or client.handshake_step()
        if client.output_pending:
            server.feed(client.take_output())
        done[1] = done[1] or server.handshake_step()
        if server.output_pending:
            client.feed(server.take_output())
        if all(done) and not client.output_pending:
            break
    assert all(done)
    assert client.read_into(memoryview(bytearray(64))) is None  # the tickets: no data
    assert client.has_ticket()
    return client, server


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 7, 4096, RECORD - 1, RECORD, 3 * RECORD + 5]), max_size=40),
    limit=st.sampled_from([RECORD, 1 << 16, 1 << 20]),
    cut=st.integers(1, 70_000),
    reads=st.lists(st.integers(1, 100_000), min_size=1, max_size=8),
)
def test_batches_arrive_whole_and_in_order(
    contexts: tuple[TlsCredentials, TlsCredentials],
    sizes: list[int],
    limit: int,
    cut: int,
    reads: list[int],
) -> None:
    client, server = handshake(contexts)
    buffers = [os.urandom(size) for size in sizes]
    views = [memoryview(b) if i % 2 else b for i, b in enumerate(buffers)]
    ciphertext = b"".join(client.encrypt(views, limit=limit))
    assert not client.output_pending
    expected = b"".join(buffers)
    assert len(expected) < 16 or expected[:16] not in ciphertext
    received = bytearray()
    for start in range(0, len(ciphertext), cut):
        server.feed(ciphertext[start : start + cut])
        while True:
            buffer = memoryview(bytearray(reads[len(received) % len(reads)]))
            count = server.read_into(buffer)
            if count is None:
                break
            assert count > 0
            received += buffer[:count]
    assert received == expected
    server.feed(client.close_notify())
    assert server.read_into(memoryview(bytearray(8))) == 0
    assert server.ended


def test_an_end_without_close_notify_is_an_end(
    contexts: tuple[TlsCredentials, TlsCredentials],
) -> None:
    client, server = handshake(contexts)
    for piece in client.encrypt([b"last words"]):
        server.feed(piece)
    server.feed(b"")  # the transport's EOF
    buffer = memoryview(bytearray(64))
    assert server.read_into(buffer) == 10 and bytes(buffer[:10]) == b"last words"
    assert server.read_into(buffer) == 0
