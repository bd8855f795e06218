"""Migration URI parsing: every accepted form and a clear error for each bad one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimig.errors import ConfigError
from trimig.transports import (
    ExecCommand,
    MemoryFabric,
    RdmaMemoryAddress,
    RdmaSocketAddress,
    TcpAddress,
    UnixAddress,
    connect,
    listen,
    parse_uri,
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp::4444", TcpAddress("", 4444)),
        ("tcp:[::1]:65535", TcpAddress("::1", 65535)),
        ("tcp:[fe80::1%eth0]:1", TcpAddress("fe80::1%eth0", 1)),
        ("unix:/run/trimig/migrate.sock", UnixAddress("/run/trimig/migrate.sock")),
        ("unix:relative.sock", UnixAddress("relative.sock")),
        ("exec:cat > /tmp/x", ExecCommand("cat > /tmp/x")),
        ("exec:gzip -c | ssh host 'cat > f:1'", ExecCommand("gzip -c | ssh host 'cat > f:1'")),
        ("rdma:/tmp/rdma.sock", RdmaSocketAddress("/tmp/rdma.sock")),
        ("rdma:mem:demo", RdmaMemoryAddress("demo")),
        ("rdma:mem:a:b", RdmaMemoryAddress("a:b")),
    ],
)
def test_accepted_forms(uri: str, expected: object) -> None:
    address = parse_uri(uri)
    assert address == expected
    assert parse_uri(address.uri) == address
    assert str(address) == address.uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "foo:bar",
            "unknown transport 'foo' in URI 'foo:bar'; expected tcp, unix, exec, rdma or file",
        ),
        ("fd:migfd", "unknown transport 'fd'"),
        ("tcp", "has no transport"),
        ("", "has no transport"),
        ("tcp:127.0.0.1", "missing port in URI"),
        ("tcp:host:http", "bad port 'http'"),
        ("tcp:host:65536", "bad port 65536"),
        ("tcp:host:-1", "bad port '-1'"),
        ("tcp:host:", "bad port ''"),
        ("tcp:::1:4444", "must be in brackets"),
        ("tcp:[::1:4444", "unclosed '\\['"),
        ("tcp:[::1]4444", "missing ':PORT'"),
        ("tcp:[nonsense]:1", "bad IPv6 address 'nonsense'"),
        ("unix:", "empty socket path"),
        ("unix:/" + "x" * 200, "too long \\(201 bytes"),
        ("exec:", "empty command"),
        ("exec:   ", "empty command"),
        ("rdma:mem:", "empty fabric name"),
        ("rdma:", "empty socket path"),
        ("rdma:ib0host:4444", "looks like QEMU's rdma:HOST:PORT"),
    ],
)
def test_bad_uris_name_the_problem(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_uri(uri)


def test_non_string_uri() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_uri(4444)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=65535))
def test_every_port_round_trips(port: int) -> None:
    assert parse_uri(f"tcp:[::1]:{port}") == TcpAddress("::1", port)
    assert parse_uri(TcpAddress("10.0.0.1", port).uri) == TcpAddress("10.0.0.1", port)


async def test_connect_refuses_port_zero_and_empty_host() -> None:
    with pytest.raises(ConfigError, match="port 0 can only be used to listen"):
        await connect("tcp:127.0.0.1:0")
    with pytest.raises(ConfigError, match="a host is needed to connect"):
        await connect("tcp::4444")


async def test_in_process_rdma_needs_a_fabric() -> None:
    with pytest.raises(ConfigError, match="pass the MemoryFabric"):
        await listen("rdma:mem:x")
    with pytest.raises(ConfigError, match="pass the MemoryFabric"):
        await connect("rdma:mem:x")


async def test_listen_reports_the_real_port() -> None:
    async with await listen("tcp:127.0.0.1:0") as listener:
        address = listener.address
        assert isinstance(address, TcpAddress)
        assert address.host == "127.0.0.1" and address.port > 0
        stream = await connect(address.uri)
        await stream.aclose()


async def test_listen_on_every_interface() -> None:
    async with await listen("tcp::0") as listener:
        address = listener.address
        assert isinstance(address, TcpAddress) and address.port > 0
        stream = await connect(f"tcp:127.0.0.1:{address.port}")
        await stream.aclose()


async def test_fabric_names_are_exclusive() -> None:
    fabric = MemoryFabric()
    async with await listen("rdma:mem:one", fabric=fabric):
        with pytest.raises(Exception, match="already in use"):
            await listen("rdma:mem:one", fabric=fabric)
    async with await listen("rdma:mem:one", fabric=fabric):
        pass  # free again after close
