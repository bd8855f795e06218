"""Transports: tcp, unix, exec, file and the RDMA-shaped one; each yields a ByteStream.

``connect(uri)`` / ``listen(uri)`` pick the transport from the URI (see ``uri.py`` for the
forms). A transport moves bytes only; it knows nothing of the migration stream format.
"""

from trimig.kernel.iov import IOV_MAX
from trimig.transports.base import (
    Buffer,
    ByteStream,
    Listener,
    RegionRegistry,
    set_channel_timeout,
    shutdown_stream,
)
from trimig.transports.endpoints import connect, listen
from trimig.transports.exec_ import PipeStream
from trimig.transports.file import FileStream
from trimig.transports.rdma_memory import MemoryFabric, MemoryStream, memory_stream_pair
from trimig.transports.socket import SocketStream
from trimig.transports.uri import (
    Address,
    ExecCommand,
    FileAddress,
    RdmaAddress,
    RdmaMemoryAddress,
    RdmaSocketAddress,
    TcpAddress,
    UnixAddress,
    parse_uri,
)

__all__ = [
    "IOV_MAX",
    "Address",
    "Buffer",
    "ByteStream",
    "ExecCommand",
    "FileAddress",
    "FileStream",
    "Listener",
    "MemoryFabric",
    "MemoryStream",
    "PipeStream",
    "RdmaAddress",
    "RdmaMemoryAddress",
    "RdmaSocketAddress",
    "RegionRegistry",
    "SocketStream",
    "TcpAddress",
    "UnixAddress",
    "connect",
    "listen",
    "memory_stream_pair",
    "parse_uri",
    "set_channel_timeout",
    "shutdown_stream",
]
