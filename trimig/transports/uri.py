"""Migration URIs: parsing and formatting.

Accepted forms (QEMU's, plus trimig's RDMA-shaped transport)::

    tcp:HOST:PORT        HOST a name, an IPv4 address or an IPv6 address in brackets
                         ("tcp:[::1]:4444"); an empty HOST ("tcp::4444") listens on every
                         interface; PORT 0 (listening only) asks the kernel for a free port
    unix:PATH            a unix stream socket at PATH
    exec:COMMAND         a shell command line run with ``sh -c COMMAND``; outgoing, the
                         stream goes to its stdin; incoming, the stream is read from its stdout
    rdma:PATH            trimig's RDMA-shaped transport between two processes: a unix socket
                         at PATH carries the message queue, RAM regions are shared memfds
    rdma:mem:NAME        the same transport inside one process (both ends in one trio run),
                         found through an explicit ``MemoryFabric`` given to connect/listen
    file:PATH[,offset=N] a file (QEMU's, since 8.2): outgoing, created (mode 0600) and cut to
                         N bytes, the stream written from there; incoming, read once from N.
                         N takes a K, M, G or T suffix. No return path.

QEMU's ``rdma:HOST:PORT`` (InfiniBand verbs) is refused with a message saying so.
"""

from __future__ import annotations

import ipaddress

import attrs

from trimig.errors import ConfigError

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_TRANSPORTS = "tcp, unix, exec, rdma or file"


@attrs.frozen
class TcpAddress:
    """``tcp:HOST:PORT``. ``host`` has no brackets; ``""`` means every interface."""

    host: str
    port: int

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class UnixAddress:
    """``unix:PATH``."""

    path: str

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class ExecCommand:
    """``exec:COMMAND``: a shell command line for ``sh -c``."""

    command: str

    @property
    def uri(self) -> str:
        return f"exec:{self.command}"

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class RdmaSocketAddress:
    """``rdma:PATH``: the RDMA-shaped transport between processes, over a unix socket at PATH."""

    path: str

    @property
    def uri(self) -> str:
        return f"rdma:{self.path}"

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class RdmaMemoryAddress:
    """``rdma:mem:NAME``: the RDMA-shaped transport within one process (needs a MemoryFabric)."""

    name: str

    @property
    def uri(self) -> str:
        return f"rdma:mem:{self.name}"

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class FileAddress:
    """``file:PATH[,offset=N]``: a file; the stream starts ``offset`` bytes into it."""

    path: str
    offset: int = 0

    @property
    def uri(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")

    def __str__(self) -> str:
        return self.uri


RdmaAddress = RdmaSocketAddress | RdmaMemoryAddress
Address = (
    TcpAddress | UnixAddress | ExecCommand | RdmaSocketAddress | RdmaMemoryAddress | FileAddress
)


def parse_uri(uri: str) -> Address:
    """Parse a migration URI; raise ConfigError naming what is wrong."""
    if not isinstance(uri, str):
        raise ConfigError(f"migration URI must be a string, not {type(uri).__name__}")
    scheme, colon, rest = uri.partition(":")
    if not colon:
        raise ConfigError(
            f"migration URI {uri!r} has no transport; expected TRANSPORT:ADDRESS "
            f"with TRANSPORT one of {_TRANSPORTS}"
        )
    if scheme == "tcp":
        return _parse_tcp(uri, rest)
    if scheme == "unix":
        return UnixAddress(_check_unix_path(uri, rest))
    if scheme == "exec":
        if not rest.strip():
            raise ConfigError(f"empty command in URI {uri!r}; expected exec:COMMAND")
        return ExecCommand(rest)
    if scheme == "rdma":
        return _parse_rdma(uri, rest)
    if scheme == "file":
        return _parse_file(uri, rest)
    raise ConfigError(f"unknown transport {scheme!r} in URI {uri!r}; expected {_TRANSPORTS}")


def _parse_tcp(uri: str, rest: str) -> TcpAddress:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ConfigError(f"unclosed '[' in IPv6 address of URI {uri!r}")
        host = rest[1:close]
        after = rest[close + 1 :]
        if not after.startswith(":"):
            raise ConfigError(f"missing ':PORT' after the IPv6 address in URI {uri!r}")
        port_text = after[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"bad IPv6 address {host!r} in URI {uri!r}") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise ConfigError(f"missing port in URI {uri!r}; expected tcp:HOST:PORT")
        if ":" in host:
            raise ConfigError(
                f"IPv6 address {host!r} in URI {uri!r} must be in brackets: tcp:[{host}]:PORT"
            )
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"bad port {port_text!r} in URI {uri!r}; expected a number 0-65535")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"bad port {port} in URI {uri!r}; expected a number 0-65535")
    return TcpAddress(host, port)


def _check_unix_path(uri: str, path: str) -> str:
    if not path:
        raise ConfigError(f"empty socket path in URI {uri!r}")
    if "\0" in path:
        raise ConfigError(f"socket path in URI {uri!r} contains a NUL byte")
    length = len(path.encode())
    if length > UNIX_PATH_MAX:
        raise ConfigError(
            f"socket path in URI {uri!r} is too long ({length} bytes; "
            f"a unix socket path holds at most {UNIX_PATH_MAX})"
        )
    return path


def _parse_rdma(uri: str, rest: str) -> RdmaAddress:
    if rest.startswith("mem:"):
        name = rest[len("mem:") :]
        if not name:
            raise ConfigError(f"empty fabric name in URI {uri!r}; expected rdma:mem:NAME")
        return RdmaMemoryAddress(name)
    _, colon, tail = rest.rpartition(":")
    if colon and "/" not in rest and tail.isdigit():
        raise ConfigError(
            f"URI {uri!r} looks like QEMU's rdma:HOST:PORT (InfiniBand), which trimig does not "
            "support; trimig's RDMA-shaped transport takes rdma:PATH (a unix socket path) or "
            "rdma:mem:NAME (in-process)"
        )
    return RdmaSocketAddress(_check_unix_path(uri, rest))


def _parse_file(uri: str, rest: str) -> FileAddress:
    """QEMU's file_parse_offset: the offset is everything after the first ``,offset=``."""
    from trimig.units import parse_size

    path, marker, offset_text = rest.partition(",offset=")
    if not path:
        raise ConfigError(f"empty file path in URI {uri!r}; expected file:PATH[,offset=N]")
    if "\0" in path:
        raise ConfigError(f"file path in URI {uri!r} contains a NUL byte")
    offset = parse_size(offset_text, what=f"offset in URI {uri!r}") if marker else 0
    return FileAddress(path, offset)
