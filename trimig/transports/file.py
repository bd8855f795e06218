"""``file:PATH[,offset=N]``: a migration stream saved to (or read from) a file, as QEMU's.

Outgoing (:func:`connect_file`), the file is opened write-only, created with mode 0600 and
cut to ``offset`` bytes (the bytes before it survive, as in QEMU 9.1+); the stream is
written from ``offset`` on with pwritev at the stream's own position, which
:meth:`FileStream.seek` moves: mapped-ram leaves room for each RAM block's pages and writes
them at fixed offsets (``savevm/mapped_ram.py``). Incoming (:func:`listen_file`), the one
"connection" reads the file once from ``offset``. There is no return path.

Regular files never block, so the calls run in the trio thread between checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

from trimig.errors import ConfigError, TransportError
from trimig.kernel.iov import GatherItem, GatherWrite, read_at
from trimig.transports.base import ListenerBase, RegionRegistry, check_receive_buffer
from trimig.transports.uri import FileAddress


class FileStream:
    """One direction of a file: written (``writable``) or read, from ``position`` on."""

    transport = "file"
    has_return_path = False
    regions: RegionRegistry | None = None

    def __init__(self, fd: int, address: FileAddress, *, writable: bool) -> None:
        self._fd: int | None = fd
        self.address = address
        self.writable = writable
        #: The file offset of the next byte written or read.
        self.position = address.offset

    @property
    def fd(self) -> int:
        """The file's descriptor (for pwrite/pread at fixed offsets: mapped-ram)."""
        if self._fd is None:
            raise TransportError(f"{self.address.uri}: the file was closed")
        return self._fd

    def seek(self, position: int) -> None:
        """Continue the stream at ``position`` (mapped-ram: after a block's page slots)."""
        self.position = position

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if not self.writable:
            raise TransportError(f"{self.address.uri} is open for reading")
        gather = GatherWrite(buffers)
        try:
            gather.write_at(self.fd, self.position)
        except OSError as error:
            raise TransportError(
                f"writing {self.address.path} at offset {self.position:#x} failed: "
                f"{error.strerror or error}"
            ) from None
        finally:
            self.position += gather.total - gather.remaining
        await trio.lowlevel.checkpoint()

    async def receive_into(self, buffer: memoryview) -> int:
        check_receive_buffer(buffer)
        if self.writable:
            raise TransportError(f"{self.address.uri} is open for writing")
        count = read_at(self.fd, buffer, self.position)
        self.position += count
        await trio.lowlevel.checkpoint()
        return count

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        await trio.lowlevel.checkpoint()


async def connect_file(address: FileAddress) -> FileStream:
    """Open ``address`` for writing: created 0600, cut to its offset (QEMU's outgoing)."""
    try:
        fd = os.open(address.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise TransportError(f"cannot create {address.path}: {error.strerror}") from None
    try:
        os.ftruncate(fd, address.offset)
    except OSError as error:
        os.close(fd)
        raise TransportError(
            f"cannot cut {address.path} to offset {address.offset}: {error.strerror}"
        ) from None
    await trio.lowlevel.checkpoint()
    return FileStream(fd, address, writable=True)


def open_for_reading(address: FileAddress) -> FileStream:
    """Open ``address`` read-only at its offset; ConfigError naming what is wrong."""
    try:
        fd = os.open(address.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{address.path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"cannot open {address.path}: {error.strerror}") from None
    size = os.fstat(fd).st_size
    if address.offset > size:
        os.close(fd)
        raise ConfigError(
            f"offset {address.offset} lies past the end of {address.path} ({size} bytes)"
        )
    return FileStream(fd, address, writable=False)


class FileListener(ListenerBase):
    """The incoming side of ``file:``: one accept() opens the file; a second waits forever
    (nothing else ever connects to a file)."""

    def __init__(self, address: FileAddress) -> None:
        self._address = address
        self._accepted = False

    @property
    def address(self) -> FileAddress:
        return self._address

    async def accept(self) -> FileStream:
        if self._accepted:
            await trio.sleep_forever()
        self._accepted = True
        await trio.lowlevel.checkpoint()
        return open_for_reading(self._address)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def listen_file(address: FileAddress) -> FileListener:
    """The incoming endpoint of ``address``; the file must exist (checked here)."""
    stream = open_for_reading(address)  # opened to check it, closed again
    await stream.aclose()
    return FileListener(address)
