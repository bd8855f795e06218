"""Connected pairs on every transport, for the transport tests (imported by conftest)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from trimig.transports import ByteStream, MemoryFabric, connect, listen


@attrs.frozen
class Setup:
    """How to make a connected pair on one transport."""

    name: str
    listen_uri: str
    connect_uri: str | None  # None: connect to the listener's real address
    fabric: MemoryFabric | None = None

    @property
    def has_return_path(self) -> bool:
        return self.name != "exec"

    @property
    def has_regions(self) -> bool:
        return self.name.startswith("rdma")


TRANSPORTS = ["tcp", "unix", "exec", "rdma-mem", "rdma-socket"]


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
    raise AssertionError(name)


@asynccontextmanager
async def connected(setup: Setup) -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    """(client, server): the connecting (source) and accepted (destination) ends."""
    async with await listen(setup.listen_uri, fabric=setup.fabric) as listener:
        target = setup.connect_uri or listener.address
        client = await connect(target, fabric=setup.fabric)
        try:
            server = await listener.accept()
            try:
                yield client, server
            finally:
                with trio.CancelScope(shield=True):
                    await server.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
