"""``connect(uri)`` and ``listen(uri)``: the entry points that pick a transport by URI."""

from __future__ import annotations

from trimig.errors import ConfigError
from trimig.transports.base import ByteStream, Listener
from trimig.transports.exec_ import connect_exec, listen_exec
from trimig.transports.file import connect_file, listen_file
from trimig.transports.rdma_memory import MemoryFabric
from trimig.transports.rdma_socket import connect_rdma_socket, listen_rdma_socket
from trimig.transports.socket import connect_tcp, connect_unix, listen_tcp, listen_unix
from trimig.transports.tls import (
    TlsListener,
    check_client_settings,
    check_tls_transport,
    tls_client,
)
from trimig.transports.tls_credentials import TlsSettings
from trimig.transports.uri import (
    Address,
    ExecCommand,
    FileAddress,
    RdmaMemoryAddress,
    RdmaSocketAddress,
    TcpAddress,
    UnixAddress,
    parse_uri,
)


def _address(uri: str | Address) -> Address:
    return parse_uri(uri) if isinstance(uri, str) else uri


def _fabric(address: RdmaMemoryAddress, fabric: MemoryFabric | None) -> MemoryFabric:
    if fabric is None:
        raise ConfigError(
            f"{address.uri} is an in-process endpoint: pass the MemoryFabric shared by both "
            "ends as fabric=..."
        )
    return fabric


async def connect(
    uri: str | Address, *, fabric: MemoryFabric | None = None, tls: TlsSettings | None = None
) -> ByteStream:
    """Open the outgoing stream for ``uri``; TransportError if the destination is not there.

    ``fabric`` is needed (only) for ``rdma:mem:NAME``. For ``exec:COMMAND`` this starts
    ``sh -c COMMAND`` writing to its stdin; finish with ``send_eof()`` before ``aclose()``.
    With ``tls`` the stream is TLS, handshake done (every channel comes through here).
    """
    address = _address(uri)
    if tls is None:
        return await _connect(address, fabric)
    check_client_settings(tls, address)  # before connecting: refusals come first
    return await tls_client(await _connect(address, fabric), tls, address)


async def _connect(address: Address, fabric: MemoryFabric | None) -> ByteStream:
    match address:
        case TcpAddress():
            return await connect_tcp(address)
        case UnixAddress():
            return await connect_unix(address)
        case ExecCommand():
            return await connect_exec(address)
        case RdmaSocketAddress():
            return await connect_rdma_socket(address)
        case RdmaMemoryAddress():
            return await _fabric(address, fabric).connect(address)
        case FileAddress():
            return await connect_file(address)
    raise ConfigError(f"cannot connect to {address!r}: not a migration address")


async def listen(
    uri: str | Address, *, fabric: MemoryFabric | None = None, tls: TlsSettings | None = None
) -> Listener:
    """Open the incoming endpoint for ``uri``; ``.address`` tells the real address.

    Close it with ``aclose()`` or use it as an async context manager. ``accept()`` returns
    one ByteStream per incoming connection; for ``exec:COMMAND`` each accept() starts the
    command and reads its stdout. With ``tls`` each accepted stream is TLS, the source
    authenticated (and on the allow-list) before accept() returns.
    """
    address = _address(uri)
    if tls is None:
        return await _listen(address, fabric)
    check_tls_transport(address)
    inner = await _listen(address, fabric)
    try:
        return TlsListener(inner, tls)
    except BaseException:
        await inner.aclose()
        raise


async def _listen(address: Address, fabric: MemoryFabric | None) -> Listener:
    match address:
        case TcpAddress():
            return await listen_tcp(address)
        case UnixAddress():
            return await listen_unix(address)
        case ExecCommand():
            return await listen_exec(address)
        case RdmaSocketAddress():
            return await listen_rdma_socket(address)
        case RdmaMemoryAddress():
            return await _fabric(address, fabric).listen(address)
        case FileAddress():
            return await listen_file(address)
    raise ConfigError(f"cannot listen on {address!r}: not a migration address")
