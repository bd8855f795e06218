"""tcp/unix specifics: socket files, resets, several connections on one listener."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from trimig.errors import TransportError
from trimig.transports import ByteStream, TcpAddress, connect, listen


async def test_unix_listener_removes_its_socket_file(short_tmp: str) -> None:
    path = f"{short_tmp}/sock"
    async with await listen(f"unix:{path}"):
        assert os.path.exists(path)
    assert not os.path.exists(path)


async def test_unix_listener_replaces_a_stale_socket_file(short_tmp: str) -> None:
    path = f"{short_tmp}/sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    async with await listen(f"unix:{path}") as listener:
        stream = await connect(f"unix:{path}")
        await stream.aclose()
        accepted = await listener.accept()
        await accepted.aclose()


async def test_unix_listener_refuses_a_regular_file(short_tmp: str) -> None:
    path = f"{short_tmp}/file"
    with open(path, "w") as file:
        file.write("precious")
    with pytest.raises(TransportError, match="exists and is not a socket"):
        await listen(f"unix:{path}")
    with open(path) as file:
        assert file.read() == "precious"


async def test_unix_listener_refuses_a_live_socket(short_tmp: str) -> None:
    path = f"{short_tmp}/sock"
    async with await listen(f"unix:{path}"):
        with pytest.raises(TransportError, match="another process is listening"):
            await listen(f"unix:{path}")
        assert os.path.exists(path)


async def test_tcp_port_in_use() -> None:
    async with await listen("tcp:127.0.0.1:0") as first:
        address = first.address
        assert isinstance(address, TcpAddress)
        with pytest.raises(TransportError, match="Address already in use"):
            await listen(address.uri)


async def test_several_connections_on_one_listener() -> None:
    """The postcopy preempt channel is a second connection to the same address."""
    async with await listen("tcp:127.0.0.1:0") as listener:
        streams: list[ByteStream] = []
        try:
            for index in range(3):
                client = await connect(listener.address)
                streams.append(client)
                await client.send_buffers([bytes([index]) * 10])
            for index in range(3):
                server = await listener.accept()
                streams.append(server)
                buffer = bytearray(10)
                assert await server.receive_into(memoryview(buffer)) == 10
                assert buffer == bytes([index]) * 10
        finally:
            for stream in streams:
                await stream.aclose()


async def test_peer_reset_becomes_transport_error() -> None:
    async with await listen("tcp:127.0.0.1:0") as listener:
        client = await connect(listener.address)
        server = await listener.accept()
        try:
            # Closing with unread data makes the kernel send RST instead of FIN.
            await client.send_buffers([b"unread"])
            await trio.sleep(0.05)
            await server.aclose()
            with pytest.raises(TransportError, match=r"reset|closed the connection"):
                for _ in range(100):
                    await client.send_buffers([bytes(1 << 20)])
        finally:
            await client.aclose()
            await server.aclose()


async def test_accept_after_close_is_a_transport_error(short_tmp: str) -> None:
    listener = await listen(f"unix:{short_tmp}/sock")
    await listener.aclose()
    with pytest.raises(TransportError, match="closed locally"):
        await listener.accept()


async def test_unix_listener_leaves_another_kind_of_socket_alone(short_tmp: str) -> None:
    path = f"{short_tmp}/seqpacket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
        other.bind(path)
        other.listen(1)
        with pytest.raises(TransportError, match="is a socket in use"):
            await listen(f"unix:{path}")
        assert os.path.exists(path)
