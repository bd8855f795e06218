"""A destination that refuses the stream: the source learns it from the return path.

Over every transport with a return path (tcp, unix, rdma) the source opens it (the
``return-path`` capability is on by default) and reports ``completed`` only after the
destination's SHUT(0). Here the destination's guest refuses its device state at
load-state, after the whole stream arrived: the destination sends SHUT(1), and the source
ends ``failed`` naming that verdict, with its guest running on, dirty tracking undone.
Through OutgoingMigration.
Over exec (no return path) ``completed`` means the stream was written, as documented.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    DIRTY_RATE,
    assert_runs_undisturbed,
    guest_specs,
    migrate_and_verify,
    open_destination,
    source_guest,
)
from refusing_guest import REFUSAL

from trimig.errors import MigrationFailed, RemoteProtocolError
from trimig.migration import MigrationCapabilities, MigrationStatus
from trimig.savevm.outgoing import OutgoingMigration

#: The built-in workload, except that load-state fails with REFUSAL.
REFUSING_GUEST = [
    sys.executable,
    str(Path(__file__).with_name("refusing_guest.py")),
    "--dirty-rate",
    DIRTY_RATE,
]
VERDICT = "the destination failed to load the stream (SHUT status 1)"


def test_return_path_is_on_by_default() -> None:
    assert MigrationCapabilities().return_path is True
    assert {"capability": "return-path", "state": True} in MigrationCapabilities().query()


@pytest.mark.parametrize("transport", ["unix", "tcp", "rdma"])
async def test_source_fails_with_the_destination_verdict(transport: str) -> None:
    async with source_guest() as (guest, blocks):
        async with open_destination(
            guest_specs(), transport, guest_command=REFUSING_GUEST
        ) as destination:
            outgoing = OutgoingMigration(guest, blocks, connect_options=destination.connect_options)
            with pytest.raises(MigrationFailed) as caught, trio.fail_after(DEADLINE):
                await outgoing.run(destination.connect_uri)
            status = await destination.wait_finished()
        # The destination got the whole stream and refused it at load-state.
        assert status is MigrationStatus.FAILED
        assert REFUSAL in str(destination.error)
        # The source says so: the destination's SHUT(1), not a completed migration.
        assert outgoing.status.value is MigrationStatus.FAILED
        cause = caught.value.__cause__
        assert isinstance(cause, RemoteProtocolError), repr(cause)
        assert str(cause) == VERDICT
        info = outgoing.query()
        assert info["status"] == "failed"
        assert info["error-desc"] == VERDICT
        assert "downtime" not in info
        # ... and its guest runs on as before, and can still migrate.
        await assert_runs_undisturbed(guest, blocks)
        outgoing, verdict = await migrate_and_verify(guest, blocks, transport)
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict


async def test_exec_has_no_return_path_so_completed_means_written() -> None:
    """exec carries no return path: the source cannot hear the refusal, and ``completed``
    means the whole stream was written (docs/qmp.md says so)."""
    async with source_guest() as (guest, blocks):
        async with open_destination(
            guest_specs(), "exec", guest_command=REFUSING_GUEST
        ) as destination:
            outgoing = OutgoingMigration(guest, blocks, connect_options=destination.connect_options)
            with trio.fail_after(DEADLINE):
                await outgoing.run(destination.connect_uri)
            assert await destination.wait_finished() is MigrationStatus.FAILED
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert REFUSAL in str(destination.error)


async def test_with_return_path_off_completed_means_written() -> None:
    """``return-path`` off (QEMU's default): no return path is opened on tcp either."""
    capabilities = MigrationCapabilities(return_path=False)
    async with source_guest() as (guest, blocks):
        async with open_destination(
            guest_specs(), "tcp", guest_command=REFUSING_GUEST
        ) as destination:
            outgoing = OutgoingMigration(
                guest,
                blocks,
                capabilities=capabilities,
                connect_options=destination.connect_options,
            )
            with trio.fail_after(DEADLINE):
                await outgoing.run(destination.connect_uri)
            assert await destination.wait_finished() is MigrationStatus.FAILED
        assert outgoing.status.value is MigrationStatus.COMPLETED
