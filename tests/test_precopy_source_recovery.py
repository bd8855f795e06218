"""When the destination refuses or dies, the source guest runs on as if nothing happened.

A real OutgoingMigration meets a destination that refuses the stream (its RAM has a
different size), with and without a return path, a destination process killed in the
middle of the stream, and bad URIs. Each time: MigrationFailed with a clear message,
status ``failed``, and the source guest running (the handle and the guest say so, and its
memory keeps changing), its dirty tracking undone, and still able to migrate.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    GUEST_RAM,
    TRIMIG,
    assert_runs_undisturbed,
    migrate_and_verify,
    open_destination,
    source_guest,
)

from trimig.errors import ConfigError, MigrationFailed, RemoteProtocolError, TransportError
from trimig.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from trimig.ram_blocks import default_block_specs
from trimig.savevm.outgoing import OutgoingMigration

MiB = 1 << 20


def assert_failed(outgoing: OutgoingMigration, error: MigrationFailed, uri: str) -> None:
    assert outgoing.status.value is MigrationStatus.FAILED
    assert str(error).startswith(f"migration to {uri} failed: ")
    info = outgoing.query()
    assert info["status"] == "failed"
    assert info["error-desc"] and info["error-desc"] in str(error)


@pytest.mark.parametrize("return_path", [False, True], ids=["no-return-path", "return-path"])
async def test_destination_with_other_ram_size_refuses(return_path: bool) -> None:
    capabilities = MigrationCapabilities(return_path=return_path)
    async with source_guest() as (guest, blocks):
        smaller = default_block_specs(GUEST_RAM // 2)
        async with open_destination(smaller, "unix", capabilities=capabilities) as destination:
            outgoing = OutgoingMigration(
                guest,
                blocks,
                capabilities=capabilities,
                connect_options=destination.connect_options,
            )
            with pytest.raises(MigrationFailed) as caught, trio.fail_after(DEADLINE):
                await outgoing.run(destination.connect_uri)
            await destination.wait_finished()
        uri = destination.connect_uri
        outgoing_error = caught.value
        # The destination names the mismatch.
        assert destination.incoming.status.value is MigrationStatus.FAILED
        assert (
            f"RAM block 'pc.ram' has {GUEST_RAM} bytes in the stream but {GUEST_RAM // 2} here"
            in str(destination.error)
        )
        # The source says why it stopped: without a return path, the connection the
        # destination closed (a reset, if the destination left bytes unread); with one,
        # the destination's SHUT(1), which came before the close (after it, if the send
        # failed first, the source waited for it).
        cause = outgoing_error.__cause__
        verdict = "the destination failed to load the stream (SHUT status 1)"
        if return_path:
            assert verdict in outgoing.query()["error-desc"], repr(cause)
        if isinstance(cause, TransportError):
            reason = str(cause)
            assert "the peer closed the connection" in reason or "reset by peer" in reason, reason
        else:
            assert return_path, repr(cause)
            assert isinstance(cause, RemoteProtocolError), repr(cause)
            assert str(cause) == verdict
        assert_failed(outgoing, outgoing_error, uri)
        await assert_runs_undisturbed(guest, blocks)
        # And it can still migrate, to a destination that fits.
        outgoing, verdict = await migrate_and_verify(guest, blocks, "unix")
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict


def guest_pids_of(pid: int) -> set[int]:
    """The children of process ``pid`` (its guest)."""
    children: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                children.update(int(child) for child in file.read().split())
        except FileNotFoundError:
            pass
    return children


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_destination_killed_mid_stream() -> None:
    """``trimig incoming`` is SIGKILLed while the (rate-limited) stream is half way."""
    command = [*TRIMIG, "incoming", "--ram", "64M", "tcp:127.0.0.1:0"]
    with trio.fail_after(DEADLINE):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            assert process.stderr is not None
            banner = b""
            while b"\n" not in banner:
                chunk = await process.stderr.receive_some()
                assert chunk, f"trimig incoming exited early: {banner!r}"
                banner += chunk
            line = banner.decode().splitlines()[0]
            assert line.startswith("trimig: listening on tcp:127.0.0.1:"), line
            uri = line.rpartition(" ")[2]
            async with source_guest() as (guest, blocks):
                parameters = MigrationParameters()
                parameters.set("max-bandwidth", "32M")  # two seconds for the bulk pass
                outgoing = OutgoingMigration(guest, blocks, parameters=parameters)
                orphans: set[int] = set()
                async with trio.open_nursery() as nursery:

                    async def kill_half_way() -> None:
                        while outgoing.query().get("ram", {}).get("transferred", 0) < 16 * MiB:
                            await trio.sleep(0.01)
                        assert outgoing.status.value is MigrationStatus.ACTIVE
                        orphans.update(guest_pids_of(process.pid))
                        process.send_signal(signal.SIGKILL)

                    nursery.start_soon(kill_half_way)
                    with pytest.raises(MigrationFailed) as caught:
                        await outgoing.run(uri)
                assert isinstance(caught.value.__cause__, TransportError), repr(caught.value)
                assert_failed(outgoing, caught.value, uri)
                assert outgoing.query()["ram"]["transferred"] < GUEST_RAM
                await assert_runs_undisturbed(guest, blocks)
            assert await process.wait() == -signal.SIGKILL
            # The dead destination's guest noticed its engine went away and ended too.
            assert orphans
            while not all(is_gone(pid) for pid in orphans):
                await trio.sleep(0.05)
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()
                if process.stderr is not None:
                    await process.stderr.aclose()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("bogus:somewhere", "unknown transport 'bogus'"),
        ("tcp:localhost", "missing port"),
        ("rdma:10.0.0.1:4444", "InfiniBand"),
        ("rdma:mem:nowhere", "MemoryFabric"),
    ],
)
async def test_bad_uri_fails_naming_it_and_leaves_the_guest_alone(uri: str, expected: str) -> None:
    async with source_guest(warmup=0.05) as (guest, blocks):
        outgoing = OutgoingMigration(guest, blocks)
        with pytest.raises(MigrationFailed) as caught:
            await outgoing.run(uri)
        cause = caught.value.__cause__
        assert isinstance(cause, ConfigError), repr(cause)
        assert uri in str(cause) and expected in str(cause)
        assert_failed(outgoing, caught.value, uri)
        await assert_runs_undisturbed(guest, blocks)


async def test_nobody_listening_fails_naming_the_address(tmp_path: os.PathLike[str]) -> None:
    uri = f"unix:{tmp_path}/nobody"
    async with source_guest(warmup=0.05) as (guest, blocks):
        outgoing = OutgoingMigration(guest, blocks)
        with pytest.raises(MigrationFailed) as caught:
            await outgoing.run(uri)
        assert isinstance(caught.value.__cause__, TransportError), repr(caught.value)
        assert_failed(outgoing, caught.value, uri)
        await assert_runs_undisturbed(guest, blocks)
