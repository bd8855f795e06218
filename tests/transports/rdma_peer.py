"""The other process of the rdma:PATH tests: ``python rdma_peer.py MODE URI NAME PAGES``.

MODE ``source``: write PAGES pattern pages into the test's region NAME, announce them on the
stream, wait for "ack" on the return path. MODE ``destination``: register a memfd region
NAME of PAGES pages, wait for the announcement, check the pages the test wrote and answer
"ok" or "bad". MODE ``vanish``: connect and exit at once. Exit status 0 means success.
"""

from __future__ import annotations

import mmap
import os
import sys

import trio

from trimig.channel import MigrationChannel
from trimig.transports import connect

PAGE = 4096


def pattern(index: int) -> bytes:
    return bytes([index % 251 + 1]) * PAGE


async def source(channel: MigrationChannel, name: str, pages: int) -> None:
    regions = channel.stream.regions
    assert regions is not None
    region = await regions.remote(name)
    for index in range(pages):
        region[index * PAGE : (index + 1) * PAGE] = pattern(index)
    region.release()
    channel.put_counted_string(name)
    channel.put_be32(pages)
    await channel.flush()
    assert await channel.return_path().get_exactly(3) == b"ack"
    await channel.send_eof()


async def destination(channel: MigrationChannel, name: str, pages: int) -> None:
    regions = channel.stream.regions
    assert regions is not None
    fd = os.memfd_create("rdma-peer", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE)
    with mmap.mmap(fd, pages * PAGE) as mapping:
        view = memoryview(mapping)
        await regions.register(name, fd, pages * PAGE, view)
        assert await channel.get_counted_string() == name.encode()
        written = await channel.get_be32()
        good = all(view[i * PAGE : (i + 1) * PAGE] == pattern(i) for i in range(written))
        view.release()
    os.close(fd)
    reply = channel.return_path()
    reply.put(b"ok" if good else b"bad")
    await reply.send_eof()
    if not good:
        sys.exit(1)


async def main(mode: str, uri: str, name: str, pages: int) -> None:
    stream = await connect(uri)
    channel = MigrationChannel(stream)
    try:
        if mode == "source":
            await source(channel, name, pages)
        elif mode == "destination":
            await destination(channel, name, pages)
        elif mode != "vanish":
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        await channel.aclose()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
