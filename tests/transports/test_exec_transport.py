"""exec specifics: save/restore through files, exit statuses, killing and reaping children."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from leakcheck import child_pids

from trimig.errors import TransportError
from trimig.transports import PipeStream, connect, listen


async def read_all(stream: PipeStream) -> bytes:
    chunks = []
    buffer = bytearray(1 << 16)
    while count := await stream.receive_into(memoryview(buffer)):
        chunks.append(bytes(buffer[:count]))
    return b"".join(chunks)


async def test_save_to_a_file_and_restore_from_it(short_tmp: str) -> None:
    path = f"{short_tmp}/saved stream"
    data = os.urandom(3 << 20)
    writer = await connect(f"exec:cat > '{path}'")
    try:
        await writer.send_buffers([data[:5], memoryview(data)[5:]])
        await writer.send_eof()  # waits for cat to finish writing
    finally:
        await writer.aclose()
    with open(path, "rb") as file:
        assert file.read() == data
    async with await listen(f"exec:cat '{path}'") as listener:
        reader = await listener.accept()
        assert isinstance(reader, PipeStream)
        try:
            assert await read_all(reader) == data
        finally:
            await reader.aclose()


async def test_pipeline_through_gzip(short_tmp: str) -> None:
    path = f"{short_tmp}/stream.gz"
    data = bytes(range(256)) * 4096
    writer = await connect(f"exec:gzip -c > {path}")
    await writer.send_buffers([data])
    await writer.send_eof()
    await writer.aclose()
    assert os.path.getsize(path) < len(data) // 10
    async with await listen(f"exec:gzip -dc {path}") as listener:
        reader = await listener.accept()
        assert isinstance(reader, PipeStream)
        try:
            assert await read_all(reader) == data
        finally:
            await reader.aclose()


async def test_reader_reports_failure_with_status_and_stderr(short_tmp: str) -> None:
    async with await listen(f"exec:cat {short_tmp}/missing") as listener:
        reader = await listener.accept()
        try:
            with pytest.raises(TransportError) as caught:
                await reader.receive_into(memoryview(bytearray(10)))
        finally:
            await reader.aclose()
    message = str(caught.value)
    assert "exited with status 1" in message
    assert "No such file or directory" in message
    assert f"cat {short_tmp}/missing" in message


async def test_writer_reports_non_zero_exit_at_eof() -> None:
    writer = await connect("exec:cat > /dev/null; exit 3")
    try:
        await writer.send_buffers([b"some bytes"])
        with pytest.raises(TransportError, match="exited with status 3"):
            await writer.send_eof()
    finally:
        await writer.aclose()


async def test_writer_whose_command_stops_reading() -> None:
    writer = await connect("exec:head -c 10 > /dev/null")
    try:
        with pytest.raises(TransportError, match="stopped reading the stream"):
            for _ in range(64):
                await writer.send_buffers([bytes(1 << 20)])
    finally:
        await writer.aclose()


async def test_cancelled_writer_kills_the_whole_pipeline() -> None:
    writer = await connect("exec:cat | sleep 1000")
    assert isinstance(writer, PipeStream)
    group = writer.pid
    with trio.move_on_after(0.2) as scope:
        await writer.send_eof()  # sleep never exits by itself
    assert scope.cancelled_caught
    assert writer.pid in child_pids()
    await writer.aclose()
    assert writer.pid not in child_pids()
    # cat and sleep were grandchildren (reaped by init, whenever it gets to it): no
    # process of the group may still run (a zombie has ended).
    with trio.fail_after(5):
        while _running_in_group(group):
            await trio.sleep(0.01)


def _running_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that have not ended (zombies excluded)."""
    running = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state not in ("Z", "X"):
            running.append(int(entry))
    return running


async def test_aclose_without_eof_aborts_the_command(short_tmp: str) -> None:
    marker = f"{short_tmp}/finished"
    writer = await connect(f"exec:cat > /dev/null && touch {marker}")
    await writer.send_buffers([b"partial"])
    await writer.aclose()
    assert not os.path.exists(marker)


async def test_killed_reader_is_reported_as_killed() -> None:
    async with await listen("exec:kill -TERM $$") as listener:
        reader = await listener.accept()
        try:
            with pytest.raises(TransportError, match="killed by SIGTERM"):
                await reader.receive_into(memoryview(bytearray(10)))
        finally:
            await reader.aclose()


async def test_each_accept_starts_the_command_again(short_tmp: str) -> None:
    async with await listen("exec:echo once") as listener:
        for _ in range(2):
            reader = await listener.accept()
            assert isinstance(reader, PipeStream)
            try:
                assert await read_all(reader) == b"once\n"
            finally:
                await reader.aclose()


async def test_child_sees_eof_on_stdin_and_writer_output_is_discarded() -> None:
    """The reader's command gets /dev/null as stdin; the writer's stdout goes nowhere."""
    async with await listen("exec:cat; echo end") as listener:
        reader = await listener.accept()
        assert isinstance(reader, PipeStream)
        try:
            assert await read_all(reader) == b"end\n"
        finally:
            await reader.aclose()
    writer = await connect("exec:cat")
    await writer.send_buffers([b"to /dev/null\n"])
    await writer.send_eof()
    await writer.aclose()


def test_sigpipe_is_ignored() -> None:
    """Python ignores SIGPIPE, so a dead reader shows up as EPIPE, not a dead engine."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
