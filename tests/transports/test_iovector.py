"""IoVector gather arrays: sent by every transport, partial writev, pwritev of page rows."""

from __future__ import annotations

import os

import numpy as np
import pytest
import trio
from test_conformance import receive_all
from transport_pairs import Setup, connected

from trimig.errors import KernelError, LocalProtocolError
from trimig.kernel.iov import GatherCopy, IoVector, flatten, write_rows_at
from trimig.transports import IOV_MAX, SocketStream

PAGE = 4096


def scattered_vector(memory: np.ndarray, seed: int) -> tuple[IoVector, bytes]:
    """An IoVector of many odd-sized pieces of ``memory`` in shuffled order, and its bytes."""
    rng = np.random.default_rng(seed)
    count = 3 * IOV_MAX + 17  # more than one writev
    starts = rng.integers(0, len(memory) - PAGE, count).astype(np.uint64)
    lengths = rng.choice([0, 1, 8, 13, PAGE], count).astype(np.uint64)
    entries = np.stack([starts + np.uint64(memory.ctypes.data), lengths], axis=1)
    expected = b"".join(
        memory[int(s) : int(s) + int(n)].tobytes() for s, n in zip(starts, lengths, strict=True)
    )
    return IoVector(entries, (memory,)), expected


async def test_every_transport_sends_vectors_mixed_with_buffers(setup: Setup) -> None:
    memory = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    vector, expected = scattered_vector(memory, seed=2)
    items = [b"head", vector, bytearray(b"middle"), memoryview(b"tail")]
    want = b"head" + expected + b"middle" + b"tail"
    async with connected(setup) as (client, server):
        received = b""

        async def receiver() -> None:
            nonlocal received
            received = await receive_all(server, len(want))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await client.send_buffers(items)
            await client.send_eof()
    assert received == want


async def test_partial_writev_resumes_inside_an_entry() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    right.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    sender = SocketStream(left, transport="unix", peer="socketpair")
    receiver = SocketStream(right, transport="unix", peer="socketpair")
    memory = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8)
    # Entries of 3000 bytes never line up with the socket's buffer, so writes end mid-entry.
    starts = np.arange(0, len(memory) - 3000, 3000, dtype=np.uint64)
    entries = np.stack(
        [starts + np.uint64(memory.ctypes.data), np.full(len(starts), 3000, np.uint64)], axis=1
    )
    want = memory[: len(starts) * 3000].tobytes()
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                buffer = bytearray(5000)
                while count := await receiver.receive_into(memoryview(buffer)):
                    received.extend(buffer[:count])

            nursery.start_soon(receive)
            await sender.send_buffers([IoVector(entries, (memory,))])
            await sender.send_eof()
    finally:
        await sender.aclose()
        await receiver.aclose()
    assert received == want
    # The caller's array is untouched by the partial-write bookkeeping.
    assert (entries[:, 1] == 3000).all()


def test_vector_views_and_flatten() -> None:
    memory = np.arange(64, dtype=np.uint8)
    base = np.uint64(memory.ctypes.data)
    entries = np.array([[base + np.uint64(10), 3], [base, 0], [base, 2]], dtype=np.uint64)
    vector = IoVector(entries, (memory,))
    assert vector.nbytes == 5 and len(vector) == 3
    assert [bytes(view) for view in flatten([b"x", vector])] == [b"x", b"\x0a\x0b\x0c", b"\0\1"]


def test_vector_refuses_a_bad_array() -> None:
    with pytest.raises(LocalProtocolError, match=r"\(n, 2\) uint64"):
        IoVector(np.zeros((3, 3), dtype=np.uint64), ())
    with pytest.raises(LocalProtocolError, match=r"\(n, 2\) uint64"):
        IoVector(np.zeros((3, 2), dtype=np.int64), ())


def test_write_rows_at_writes_strided_rows_into_a_memfd() -> None:
    fd = os.memfd_create("rows")
    try:
        os.ftruncate(fd, 2048 * PAGE)
        records = np.random.default_rng(4).integers(0, 256, (IOV_MAX + 5, PAGE + 8), dtype=np.uint8)
        rows = records[:, 8:]  # page payloads of wire records: strided, each row contiguous
        write_rows_at(fd, 3 * PAGE, rows)
        assert os.pread(fd, len(rows) * PAGE, 3 * PAGE) == rows.tobytes()
        assert os.pread(fd, 3 * PAGE, 0) == bytes(3 * PAGE)  # before: still a hole
    finally:
        os.close(fd)


def test_write_rows_at_reports_kernel_errors() -> None:
    rows = np.zeros((1, PAGE), dtype=np.uint8)
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        with pytest.raises(KernelError, match="pwritev"):
            write_rows_at(read_end, 0, rows)
    finally:
        os.close(read_end)
    with pytest.raises(LocalProtocolError, match="uint8 rows"):
        write_rows_at(0, 0, np.zeros((2, 4), dtype=np.uint16))


@pytest.mark.parametrize("size", [999, 4095, 1 << 16, 1 << 20])
def test_gather_copy_fills_buffers_in_order(size: int) -> None:
    memory = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    vector, expected = scattered_vector(memory, seed=6)
    gather = GatherCopy([b"head", vector, memoryview(b"tail")])
    want = b"head" + expected + b"tail"
    assert gather.remaining == len(want)
    buffer = memoryview(bytearray(size))
    got = bytearray()
    while gather.remaining:
        count = gather.copy_into(buffer)
        assert count == min(size, len(want) - len(got))
        got += buffer[:count]
    assert got == want
    assert gather.copy_into(buffer) == 0


def test_gather_copy_of_unmapped_memory_is_a_kernel_error() -> None:
    entries = np.array([[4096, PAGE]], dtype=np.uint64)  # address 4096: never mapped
    with pytest.raises(KernelError, match="process_vm_readv"):
        GatherCopy([IoVector(entries, ())]).copy_into(memoryview(bytearray(PAGE)))
