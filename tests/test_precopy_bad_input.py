"""Bad input on the destination: a clear error naming what was wrong, never a hang.

Crafted streams (wrong magic, wrong version, an unknown section, an unknown RAM block)
go through a real unix socket; a real recorded stream is replayed cut at many offsets
through ``exec:head -c N FILE``, and a ``trimig migrate`` process is killed half way.
Bad URIs are refused with a ConfigError naming them.
The source side of a refusal is in test_precopy_source_recovery.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    GUEST_COMMAND,
    GUEST_RAM,
    TRIMIG,
    guest_specs,
    open_destination,
    source_guest,
)

from trimig import codec
from trimig.errors import ConfigError, MigrationFailed, RemoteProtocolError
from trimig.guest.workload import WorkloadState
from trimig.loadvm.incoming import IncomingMigration
from trimig.migration import MigrationStatus
from trimig.savevm.outgoing import GUEST_SECTION_ID, RAM_SECTION_ID, OutgoingMigration
from trimig.transports import connect

MiB = 1 << 20
#: A guest that speaks the guest protocol and nothing more (hello, ping, quit, ...).
MINIMAL_GUEST = [
    sys.executable,
    str(Path(__file__).with_name("guest") / "fake_guest.py"),
    "minimal",
]


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temporary directory with a short path (unix socket paths hold 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tpb", dir="/tmp") as path:
        yield path


async def load(
    listen_uri: str,
    *,
    send: bytes | None = None,
    guest_command: Sequence[str] = GUEST_COMMAND,
) -> tuple[IncomingMigration, BaseException | None]:
    """Run a destination on ``listen_uri`` until it ends (bounded); if ``send`` is given,
    connect to it and send those bytes, then EOF. Returns the destination and its error."""
    incoming = IncomingMigration(guest_specs(), guest_command=guest_command)
    error: BaseException | None = None
    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:

                async def receive(*, task_status: trio.TaskStatus[str]) -> None:
                    nonlocal error
                    try:
                        await incoming.listen_and_run(listen_uri, task_status=task_status)
                    except MigrationFailed as exc:
                        error = exc

                address = await nursery.start(receive)
                if send is not None:
                    stream = await connect(address)
                    try:
                        await stream.send_buffers([send])
                        await stream.send_eof()
                        await incoming.status.wait_value(
                            lambda s: s in (MigrationStatus.FAILED, MigrationStatus.COMPLETED)
                        )
                    finally:
                        await stream.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await incoming.aclose()
    return incoming, error


def remote_protocol_error(error: BaseException | None) -> RemoteProtocolError:
    """The RemoteProtocolError behind a destination's MigrationFailed."""
    assert isinstance(error, MigrationFailed), repr(error)
    cause = error.__cause__
    assert isinstance(cause, RemoteProtocolError), repr(cause)
    assert str(cause) in str(error)
    return cause


def stream_start() -> bytes:
    return codec.encode_file_header() + codec.encode_configuration()


def ram_setup(blocks: Sequence[tuple[str, int]]) -> bytes:
    infos = [codec.RamBlockInfo(name, size, 4096) for name, size in blocks]
    return (
        codec.encode_section_start(RAM_SECTION_ID, "ram", 0, 4)
        + codec.encode_mem_size(infos, postcopy=False)
        + codec.encode_end_of_section()
        + codec.encode_section_footer(RAM_SECTION_ID)
    )


def guest_section(idstr: str = "guest") -> bytes:
    return (
        codec.encode_section_full(GUEST_SECTION_ID, idstr, 0, 1)
        + codec.encode_blob(b"{}")
        + codec.encode_section_footer(GUEST_SECTION_ID)
    )


GOOD_RAM = ram_setup([("pc.ram", GUEST_RAM)])


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"QEVN" + stream_start()[4:], "bad magic 0x5145564e", id="wrong-magic"),
        pytest.param(b"\0\0\0\0" + stream_start()[4:], "bad magic 0x00000000", id="zero-magic"),
        pytest.param(
            stream_start()[:4] + b"\0\0\0\x02" + stream_start()[8:],
            "obsolete stream version 2",
            id="version-2",
        ),
        pytest.param(
            stream_start()[:4] + b"\0\0\0\x04" + stream_start()[8:],
            "unsupported stream version 4",
            id="version-4",
        ),
        pytest.param(
            stream_start() + GOOD_RAM + guest_section("bogus-device") + codec.encode_eof(),
            "unknown section 'bogus-device'",
            id="unknown-section",
        ),
        pytest.param(
            stream_start() + ram_setup([("pc.bogus", GUEST_RAM)]) + codec.encode_eof(),
            "'pc.bogus'",
            id="unknown-block",
        ),
        pytest.param(
            stream_start() + ram_setup([("pc.ram", 32 * MiB)]) + codec.encode_eof(),
            f"RAM block 'pc.ram' has {32 * MiB} bytes in the stream but {GUEST_RAM} here",
            id="block-size-differs",
        ),
        pytest.param(
            stream_start()
            + ram_setup([("pc.ram", GUEST_RAM), ("pc.extra", 2 * MiB)])
            + codec.encode_eof(),
            "'pc.extra'",
            id="extra-block",
        ),
        pytest.param(
            stream_start() + GOOD_RAM + codec.encode_eof(),
            "without the guest's device state",
            id="no-device-state",
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "bad magic", id="not-a-migration"),
    ],
)
async def test_bad_stream_is_refused_naming_the_problem(
    stream: bytes, expected: str, short_tmp: str
) -> None:
    incoming, error = await load(f"unix:{short_tmp}/sock", send=stream)
    cause = remote_protocol_error(error)
    assert expected in str(cause)
    assert incoming.status.value is MigrationStatus.FAILED
    assert expected in incoming.query()["error-desc"]
    assert incoming.guest is None and incoming.blocks == []  # closed, never run


# -- a real stream, cut ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="trimig-recording-") as path:
        yield path


@pytest.fixture
async def recorded_stream(recording_dir: str) -> AsyncIterator[str]:
    """A real precopy stream of a running GUEST_RAM guest, recorded with exec:cat > FILE
    (recorded once per module; later tests reuse the file)."""
    path = os.path.join(recording_dir, "stream.bin")
    if not os.path.exists(path):
        async with source_guest() as (guest, blocks):
            outgoing = OutgoingMigration(guest, blocks)
            with trio.fail_after(DEADLINE):
                await outgoing.run(f"exec:cat > {path}.part")
            assert outgoing.status.value is MigrationStatus.COMPLETED
        os.rename(f"{path}.part", path)
    yield path


def cut_offsets(length: int) -> list[int]:
    """Where to cut: in and at the edges of the setup records, through the RAM passes,
    and in the device state and EOF at the end."""
    header = len(codec.encode_file_header())
    start = len(stream_start())
    setup = start + len(GOOD_RAM)
    edges = [
        0,
        1,
        4,
        header - 1,
        header,
        header + 1,
        start - 1,
        start,
        start + 1,
        setup - 5,
        setup - 1,
        setup,
        setup + 1,
        setup + 8,
        setup + 4096,
    ]
    through = [length * k // 10 for k in range(1, 10)]
    tail = [length - n for n in (1, 2, 5, 6, 7, 64, 300)]
    return sorted({offset for offset in edges + through + tail if 0 <= offset < length})


async def test_recorded_stream_replays_whole(recorded_stream: str) -> None:
    """The control: the whole recording loads, and the guest on it verifies."""
    assert os.path.getsize(recorded_stream) > GUEST_RAM
    incoming = IncomingMigration(guest_specs(), guest_command=GUEST_COMMAND)
    try:
        with trio.fail_after(DEADLINE):
            await incoming.listen_and_run(f"exec:cat {recorded_stream}")
            assert incoming.status.value is MigrationStatus.COMPLETED
            guest, blocks = incoming.take_guest()
            try:
                await trio.sleep(0.1)
                await guest.stop()
                verdict = await guest.verify()
            finally:
                with trio.CancelScope(shield=True):
                    await guest.aclose()
                for block in blocks:
                    block.close()
    finally:
        await incoming.aclose()
    assert verdict.verified, verdict


async def replay_cuts(
    recorded_stream: str, offsets: Sequence[int], guest_command: Sequence[str]
) -> None:
    """Replay the recording cut at each offset; each must fail naming the truncation."""
    errors: dict[int, BaseException | None] = {}
    statuses: dict[int, MigrationStatus] = {}
    limiter = trio.CapacityLimiter(3)  # each destination starts a guest process

    async def replay(offset: int) -> None:
        async with limiter:
            incoming, errors[offset] = await load(
                f"exec:head -c {offset} {recorded_stream}", guest_command=guest_command
            )
            statuses[offset] = incoming.status.value

    with trio.fail_after(DEADLINE * 2):
        async with trio.open_nursery() as nursery:
            for offset in offsets:
                nursery.start_soon(replay, offset)
    for offset in offsets:
        cause = remote_protocol_error(errors[offset])
        assert "truncated" in str(cause), (offset, str(cause))
        assert statuses[offset] is MigrationStatus.FAILED, offset


async def test_stream_cut_anywhere_is_a_truncation_error(recorded_stream: str) -> None:
    """Many cuts. The destination's guest is never given memory when the stream is cut,
    so a minimal protocol-only guest stands in for the workload here (it starts in
    milliseconds); the next test cuts with the real guest."""
    offsets = cut_offsets(os.path.getsize(recorded_stream))
    assert len(offsets) >= 30
    await replay_cuts(recorded_stream, offsets, MINIMAL_GUEST)


async def test_stream_cut_with_the_workload_guest(recorded_stream: str) -> None:
    length = os.path.getsize(recorded_stream)
    setup = len(stream_start()) + len(GOOD_RAM)
    await replay_cuts(recorded_stream, [setup + 1, length // 2, length - 1], GUEST_COMMAND)


# -- bad URIs ----------------------------------------------------------------------------

BAD_URIS = [
    ("bogus:somewhere", "unknown transport 'bogus'"),
    ("tcp:localhost", "missing port"),
    ("tcp:127.0.0.1:99999", "bad port 99999"),
    ("unix:", "empty socket path"),
    ("exec:", "empty command"),
    ("rdma:10.0.0.1:4444", "InfiniBand"),
    ("nocolon", "has no transport"),
]


@pytest.mark.parametrize(("uri", "expected"), BAD_URIS)
async def test_bad_listen_uri_is_a_config_error(uri: str, expected: str) -> None:
    incoming = IncomingMigration(guest_specs(), guest_command=GUEST_COMMAND)
    with pytest.raises(ConfigError) as caught:
        await incoming.listen_and_run(uri)
    assert uri in str(caught.value) and expected in str(caught.value)
    assert incoming.status.value is MigrationStatus.FAILED
    await incoming.aclose()


async def test_source_process_killed_mid_stream() -> None:
    """``trimig migrate`` (rate-limited) is SIGKILLed half way: the destination here fails
    naming the truncation, at once, and closes its guest."""
    async with open_destination(guest_specs(), "tcp") as destination:
        command = [
            *TRIMIG, "migrate", destination.connect_uri,
            "--ram", "64M", "--max-bandwidth", "32M", "--warmup", "0",
        ]  # fmt: skip
        with trio.fail_after(DEADLINE):
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                await destination.incoming.status.wait_value(MigrationStatus.ACTIVE)
                await trio.sleep(0.5)  # a quarter of the two seconds the RAM takes
                assert destination.incoming.status.value is MigrationStatus.ACTIVE
                process.send_signal(signal.SIGKILL)
                status = await destination.wait_finished()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
        assert status is MigrationStatus.FAILED
        cause = remote_protocol_error(destination.error)
        assert "truncated" in str(cause)
        assert destination.incoming.guest is None and destination.incoming.blocks == []


# -- the end of the stream: nothing but a VM description may follow QEMU_VM_EOF ----------


def shell_quote(path: str) -> str:
    assert "'" not in path
    return f"'{path}'"


@pytest.mark.parametrize(
    ("trailer", "shown"),
    [
        pytest.param("printf XYZ", "58 59 5a", id="with-eof"),
        # Written after a pause: the destination must still be reading when it comes.
        pytest.param("sleep 0.5; printf XYZ", "58 59 5a", id="later"),
        pytest.param("printf '\\000\\000'", "00 00", id="a-second-eof"),
    ],
)
async def test_bytes_after_eof_are_refused_naming_them(
    recorded_stream: str, trailer: str, shown: str
) -> None:
    """A whole real stream (no return path) with bytes after its QEMU_VM_EOF: the
    destination fails naming them, and never runs the guest."""
    incoming, error = await load(f"exec:cat {shell_quote(recorded_stream)}; {trailer}")
    cause = remote_protocol_error(error)
    assert "after QEMU_VM_EOF" in str(cause), str(cause)
    assert shown in str(cause), str(cause)
    assert incoming.status.value is MigrationStatus.FAILED
    assert "after QEMU_VM_EOF" in incoming.query()["error-desc"]
    assert incoming.guest is None and incoming.blocks == []


async def test_a_vm_description_may_follow_eof_but_nothing_after_it(
    recorded_stream: str,
) -> None:
    description = "printf '\\006\\000\\000\\000\\002{}'"
    incoming, error = await load(f"exec:cat {shell_quote(recorded_stream)}; {description}")
    assert error is None, error
    assert incoming.status.value is MigrationStatus.COMPLETED
    incoming, error = await load(
        f"exec:cat {shell_quote(recorded_stream)}; {description}; sleep 0.3; printf Q"
    )
    cause = remote_protocol_error(error)
    assert "after the end of the stream" in str(cause) and "51" in str(cause), str(cause)
    assert incoming.status.value is MigrationStatus.FAILED


# -- the destination's verdict on the return path: SHUT(0) or SHUT(1) --------------------


def crafted_stream_with_return_path(*, tail: bytes = b"") -> bytes:
    """A whole, valid stream of a zero-filled GUEST_RAM guest that asks for a return path,
    ending with its QEMU_VM_EOF and then ``tail``."""
    state = WorkloadState(seed=0, fill="zero", passes=0, cursor=0, page_count=GUEST_RAM // 4096)
    return (
        stream_start()
        + codec.encode_open_return_path()
        + GOOD_RAM
        + codec.encode_device_section(GUEST_SECTION_ID, "guest", 0, 1, state.to_bytes())
        + codec.encode_eof()
        + tail
    )


async def load_with_return_path(
    short_tmp: str, data: bytes
) -> tuple[IncomingMigration, BaseException | None, list[object]]:
    """Send ``data`` to a destination over a unix socket in one write, then read the
    return path until the destination closes it, as a source with a return path does (it
    keeps its direction open until the destination's SHUT). Returns the destination, its
    error and the return-path messages, the last being ChannelClosed."""
    incoming = IncomingMigration(guest_specs(), guest_command=GUEST_COMMAND)
    error: BaseException | None = None
    messages: list[object] = []
    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:

                async def receive(*, task_status: trio.TaskStatus[str]) -> None:
                    nonlocal error
                    try:
                        await incoming.listen_and_run(
                            f"unix:{short_tmp}/sock", task_status=task_status
                        )
                    except MigrationFailed as exc:
                        error = exc

                address = await nursery.start(receive)
                stream = await connect(address)
                try:
                    await stream.send_buffers([data])
                    decoder = codec.ReturnPathDecoder()
                    buffer = bytearray(4096)
                    while not messages or not isinstance(messages[-1], codec.ChannelClosed):
                        event = decoder.next_event()
                        if event is codec.NEED_DATA:
                            count = await stream.receive_into(memoryview(buffer))
                            if count:
                                decoder.receive_data(buffer[:count])
                            else:
                                decoder.receive_eof()
                        else:
                            messages.append(event)
                finally:
                    await stream.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await incoming.aclose()
    return incoming, error, messages


async def test_destination_says_shut_0_when_it_loaded_the_stream(short_tmp: str) -> None:
    """The control: a good stream over a return path ends with SHUT(0), then the close."""
    incoming, error, messages = await load_with_return_path(
        short_tmp, crafted_stream_with_return_path()
    )
    assert error is None, error
    assert incoming.status.value is MigrationStatus.COMPLETED
    assert messages == [codec.Shut(0), codec.ChannelClosed()]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            crafted_stream_with_return_path(tail=b"XYZ"),
            "after QEMU_VM_EOF",
            id="bytes-after-eof",
        ),
        pytest.param(
            stream_start()
            + codec.encode_open_return_path()
            + GOOD_RAM
            + guest_section("bogus-device"),
            "unknown section 'bogus-device'",
            id="unknown-section",
        ),
        pytest.param(
            stream_start() + codec.encode_open_return_path() + ram_setup([("pc.ram", 32 * MiB)]),
            f"RAM block 'pc.ram' has {32 * MiB} bytes in the stream but {GUEST_RAM} here",
            id="block-size-differs",
        ),
        pytest.param(
            stream_start()
            + codec.encode_open_return_path()
            + GOOD_RAM
            + codec.encode_section_part(RAM_SECTION_ID)
            + b"\xff" * 8,
            "unsupported RAM record flags",
            id="malformed-ram-record",
        ),
    ],
)
async def test_destination_says_shut_1_before_it_closes_on_a_refused_stream(
    short_tmp: str, data: bytes, expected: str
) -> None:
    """A stream the destination refuses (the source keeps its direction open): it tells
    the source with SHUT(1) on the return path before it closes the connection."""
    incoming, error, messages = await load_with_return_path(short_tmp, data)
    cause = remote_protocol_error(error)
    assert expected in str(cause)
    assert incoming.status.value is MigrationStatus.FAILED
    assert messages == [codec.Shut(1), codec.ChannelClosed()], (messages, str(cause))
    assert incoming.guest is None and incoming.blocks == []
