"""rdma:PATH against a real second process, and registry rules on both flavours."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import trio
from transport_pairs import Setup, connected, make_setup

from trimig.errors import LocalProtocolError, TransportError
from trimig.transports import ByteStream, listen

PAGE = 4096
PEER = Path(__file__).with_name("rdma_peer.py")


def pattern(index: int) -> bytes:
    return bytes([index % 251 + 1]) * PAGE


async def run_peer(mode: str, uri: str, name: str, pages: int) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, str(PEER), mode, uri, name, str(pages)]
    )


async def accept_peer(short_tmp: str, mode: str, pages: int) -> tuple[ByteStream, trio.Process]:
    uri = f"rdma:{short_tmp}/rdma"
    async with await listen(uri) as listener:
        process = await run_peer(mode, uri, "pc.ram", pages)
        try:
            with trio.fail_after(20):
                return await listener.accept(), process
        except BaseException:
            process.kill()
            await process.wait()
            raise


async def test_peer_process_writes_into_our_region(short_tmp: str) -> None:
    pages = 256
    fd = os.memfd_create("rdma-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE)
    mapping = mmap.mmap(fd, pages * PAGE)
    stream, process = await accept_peer(short_tmp, "source", pages)
    try:
        assert stream.regions is not None
        view = memoryview(mapping)
        await stream.regions.register("pc.ram", fd, pages * PAGE, view)
        announcement = bytearray(64)
        count = await stream.receive_into(memoryview(announcement))
        assert announcement[:count] == b"\x06pc.ram" + pages.to_bytes(4, "big")
        for index in range(pages):
            assert view[index * PAGE : (index + 1) * PAGE] == pattern(index)
        view.release()
        await stream.send_buffers([b"ack"])
        assert await stream.receive_into(memoryview(announcement)) == 0
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        await stream.aclose()
        process.kill()
        await process.wait()
        mapping.close()
        os.close(fd)


async def test_we_write_into_the_peer_process_region(short_tmp: str) -> None:
    pages = 128
    stream, process = await accept_peer(short_tmp, "destination", pages)
    try:
        assert stream.regions is not None
        region = await stream.regions.remote("pc.ram")
        assert region.nbytes == pages * PAGE
        for index in range(pages):
            region[index * PAGE : (index + 1) * PAGE] = pattern(index)
        region.release()
        await stream.send_buffers([b"\x06pc.ram", pages.to_bytes(4, "big")])
        answer = bytearray(8)
        count = await stream.receive_into(memoryview(answer))
        assert answer[:count] == b"ok"
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        await stream.aclose()
        process.kill()
        await process.wait()


async def test_peer_process_exit_fails_remote_lookup(short_tmp: str) -> None:
    stream, process = await accept_peer(short_tmp, "vanish", 1)
    try:
        assert stream.regions is not None
        with trio.fail_after(20), pytest.raises(TransportError, match="peer went away"):
            await stream.regions.remote("pc.ram")
        assert await process.wait() == 0
    finally:
        await stream.aclose()


@pytest.fixture(params=["rdma-mem", "rdma-socket"])
def rdma_setup(request: pytest.FixtureRequest, short_tmp: str) -> Setup:
    return make_setup(request.param, short_tmp)


async def test_registration_rules(rdma_setup: Setup) -> None:
    fd = os.memfd_create("rdma-rules", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * PAGE)
    mapping = mmap.mmap(fd, 2 * PAGE)
    view = memoryview(mapping)
    try:
        async with connected(rdma_setup) as (source, destination):
            regions = destination.regions
            assert regions is not None
            with pytest.raises(LocalProtocolError, match="has 8192 bytes but its size is 4096"):
                await regions.register("a", fd, PAGE, view)
            with pytest.raises(LocalProtocolError, match="must be 1-255 bytes"):
                await regions.register("", fd, 2 * PAGE, view)
            with pytest.raises(LocalProtocolError, match="read-only"):
                await regions.register("a", fd, 2 * PAGE, memoryview(bytes(2 * PAGE)))
            await regions.register("a", fd, 2 * PAGE, view)
            with pytest.raises(LocalProtocolError, match="already registered"):
                await regions.register("a", fd, 2 * PAGE, view)
            assert source.regions is not None
            remote = await source.regions.remote("a")
            remote[:5] = b"hello"
            remote.release()
            assert view[:5] == b"hello"
            await destination.aclose()
            with pytest.raises(TransportError, match="closed"):
                await regions.register("b", fd, 2 * PAGE, view)
    finally:
        view.release()
        mapping.close()
        os.close(fd)


async def test_register_refuses_an_fd_smaller_than_the_region(short_tmp: str) -> None:
    fd = os.memfd_create("rdma-small", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    buffer = bytearray(2 * PAGE)
    try:
        async with connected(make_setup("rdma-socket", short_tmp)) as (_source, destination):
            assert destination.regions is not None
            with pytest.raises(LocalProtocolError, match="holds 4096 bytes"):
                await destination.regions.register("a", fd, 2 * PAGE, memoryview(buffer))
    finally:
        os.close(fd)


async def test_rdma_listener_refuses_a_plain_unix_client(short_tmp: str) -> None:
    uri = f"rdma:{short_tmp}/rdma"
    async with await listen(uri) as listener:
        plain = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await plain.connect(f"{short_tmp}/rdma")
            await plain.send(b"QEMU-not-trimig")
            with pytest.raises(TransportError, match="did not open with the trimig rdma handshake"):
                await listener.accept()
        finally:
            plain.close()
