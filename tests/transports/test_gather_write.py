"""The gather-write loop: batching to IOV_MAX, partial writes, no payload copies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio

from trimig.errors import LocalProtocolError
from trimig.kernel.iov import Buffer, GatherWrite, byte_buffers
from trimig.transports import IOV_MAX, SocketStream


class PartialWriter:
    """Records each gather call and accepts a random prefix of it (a logic-test stand-in)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.calls: list[list[Buffer]] = []
        self.written = bytearray()

    async def __call__(self, buffers: list[Buffer]) -> int:
        await trio.lowlevel.checkpoint()
        self.calls.append(list(buffers))
        offered = b"".join(buffers)
        count = self.random.choice([len(offered), self.random.randint(1, len(offered))])
        self.written += offered[:count]
        return count


def origin(buffer: Buffer) -> object:
    return buffer.obj if isinstance(buffer, memoryview) else buffer


async def test_partial_writes_resend_exactly_the_rest_without_copying() -> None:
    rng = np.random.default_rng(1)
    pages = [rng.bytes(4096) for _ in range(3000)]
    headers = [bytes([i % 256]) * 8 for i in range(3000)]
    buffers: list[Buffer] = [part for pair in zip(headers, pages, strict=True) for part in pair]
    writer = PartialWriter(seed=2)
    gather = GatherWrite(buffers)
    while not gather.done:
        pending = gather.pending()
        assert isinstance(pending, list)  # plain buffers, not an iovec array
        gather.advance(await writer(pending))
    assert gather.total == sum(len(b) for b in buffers)
    assert gather.remaining == 0
    assert bytes(writer.written) == b"".join(buffers)
    originals = {id(b) for b in buffers}
    for call in writer.calls:
        assert 1 <= len(call) <= IOV_MAX
        # Every entry is an original object or (the first, after a partial write) a view of one.
        assert all(id(origin(entry)) in originals for entry in call)
        assert all(not isinstance(entry, memoryview) for entry in call[1:])
    assert any(isinstance(call[0], memoryview) for call in writer.calls)


def test_byte_buffers_flattens_and_drops_empty() -> None:
    pages = np.arange(3 * 4096, dtype=np.uint8).reshape(3, 4096)
    words = np.arange(4, dtype=">u4")
    buffers = [b"", pages, words, bytearray(b"ab"), memoryview(b""), memoryview(pages)]
    views, lengths = byte_buffers(buffers)
    assert lengths == [3 * 4096, 16, 2, 3 * 4096]
    assert bytes(views[0]) == pages.tobytes()
    assert bytes(views[1]) == words.tobytes()
    assert bytes(views[3]) == pages.tobytes()
    for view in (views[0], views[1], views[3]):
        assert isinstance(view, memoryview) and view.ndim == 1 and view.itemsize == 1


def test_byte_buffers_refuses_non_contiguous() -> None:
    strided = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(LocalProtocolError, match="not contiguous"):
        byte_buffers([strided])


async def test_small_socket_buffers_force_partial_sendmsg() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    right.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    sender = SocketStream(left, transport="unix", peer="socketpair")
    receiver = SocketStream(right, transport="unix", peer="socketpair")
    data = np.random.default_rng(3).bytes(4 << 20)
    view = memoryview(data)
    pieces = [view[i : i + 1000] for i in range(0, len(data), 1000)]
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                buffer = bytearray(3000)
                while count := await receiver.receive_into(memoryview(buffer)):
                    received.extend(buffer[:count])

            nursery.start_soon(receive)
            await sender.send_buffers(pieces)
            await sender.send_eof()
    finally:
        await sender.aclose()
        await receiver.aclose()
    assert received == data
