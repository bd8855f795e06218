"""Connected pairs on every transport, for the transport tests (imported by conftest)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
import trustme
from tls_certs import write_creds

from trimig.transports import ByteStream, MemoryFabric, connect, listen
from trimig.transports.tls_credentials import TlsCredentials, TlsSettings


@attrs.frozen
class Setup:
    """How to make a connected pair on one transport."""

    name: str
    listen_uri: str
    connect_uri: str | None  # None: connect to the listener's real address
    fabric: MemoryFabric | None = None
    #: TLS: (the connecting side's settings, the listening side's), or None for plaintext.
    tls: tuple[TlsSettings, TlsSettings] | None = None

    @property
    def client_tls(self) -> TlsSettings | None:
        return self.tls[0] if self.tls else None

    @property
    def server_tls(self) -> TlsSettings | None:
        return self.tls[1] if self.tls else None

    @property
    def has_return_path(self) -> bool:
        return self.name != "exec"

    @property
    def has_regions(self) -> bool:
        return self.name.startswith("rdma")


TRANSPORTS = ["tcp", "unix", "exec", "rdma-mem", "rdma-socket", "tls-tcp", "tls-unix"]


def tls_pair(tmp: str) -> tuple[TlsSettings, TlsSettings]:
    """Client and server settings from fresh trustme certificates in ``tmp``/creds."""
    directory = write_creds(f"{tmp}/creds", trustme.CA())
    client = TlsCredentials("c", directory, endpoint="client")
    server = TlsCredentials("s", directory, endpoint="server")
    return TlsSettings(client, hostname="localhost"), TlsSettings(server)


def make_setup(name: str, tmp: str) -> Setup:
    if name == "tcp":
        return Setup(name, "tcp:127.0.0.1:0", None)
    if name == "unix":
        return Setup(name, f"unix:{tmp}/sock", None)
    if name == "exec":
        fifo = f"{tmp}/fifo"
        os.mkfifo(fifo)
        # The writer's cat fills the FIFO, the reader's cat drains it: two real sh -c children.
        return Setup(name, f"exec:cat {fifo}", f"exec:cat > {fifo}")
    if name == "rdma-mem":
        return Setup(name, "rdma:mem:test", None, MemoryFabric())
    if name == "rdma-socket":
        return Setup(name, f"rdma:{tmp}/rdma", None)
    if name == "tls-tcp":
        return Setup(name, "tcp:127.0.0.1:0", None, tls=tls_pair(tmp))
    if name == "tls-unix":
        return Setup(name, f"unix:{tmp}/sock", None, tls=tls_pair(tmp))
    raise AssertionError(name)


@asynccontextmanager
async def connected(setup: Setup) -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    """(client, server): the connecting (source) and accepted (destination) ends."""
    async with await listen(
        setup.listen_uri, fabric=setup.fabric, tls=setup.server_tls
    ) as listener:
        target = setup.connect_uri or listener.address
        accepted: list[ByteStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        async with trio.open_nursery() as nursery:  # a TLS connect needs the accept
            nursery.start_soon(accept)
            client = await connect(target, fabric=setup.fabric, tls=setup.client_tls)
        try:
            server = accepted[0]
            try:
                yield client, server
            finally:
                with trio.CancelScope(shield=True):
                    await server.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
