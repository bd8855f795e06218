"""A destination that refuses the stream: the source learns it from the return path.

Over every transport with a return path (tcp, unix, rdma) the source opens it (the
``return-path`` capability is on by default) and reports ``completed`` only after the
destination's SHUT(0). Here the destination's guest refuses its device state at
load-state, after the whole stream arrived: the destination sends SHUT(1), and the source
ends ``failed`` naming that verdict, with its guest running on, dirty tracking undone.
Through OutgoingMigration, and through the CLI as two real processes (``trimig incoming``
and ``trimig migrate``); the QMP engines (``trimig run``) are in tests/qmp/test_engines_failures.py.
Over exec (no return path) ``completed`` means the stream was written, as documented.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    DIRTY_RATE,
    GUEST_RAM,
    TRIMIG,
    assert_runs_undisturbed,
    guest_specs,
    migrate_and_verify,
    one_json_object,
    open_destination,
    run_trimig,
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
GUEST_OPTIONS = ("--ram", "64M", "--dirty-rate", DIRTY_RATE)


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


# -- the CLI: trimig incoming and trimig migrate, two real processes -------------------


def _listen_uri(transport: str, directory: str) -> str:
    if transport == "tcp":
        return "tcp:127.0.0.1:0"
    if transport == "unix":
        return f"unix:{directory}/migration.sock"
    return f"rdma:{directory}/rdma.sock"


@pytest.mark.parametrize("transport", ["tcp", "unix", "rdma"])
def test_cli_migrate_fails_when_trimig_incoming_refuses(transport: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tvd", dir="/tmp") as directory:
        incoming = subprocess.Popen(
            [
                *TRIMIG, "incoming", _listen_uri(transport, directory), "--json", *GUEST_OPTIONS,
                "--", *REFUSING_GUEST,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert incoming.stderr is not None
            ready, _, _ = select.select([incoming.stderr], [], [], DEADLINE)
            assert ready, "trimig incoming said nothing"
            line = incoming.stderr.readline().strip()
            assert line.startswith("trimig: listening on "), line
            uri = line.rpartition(" ")[2]
            migrate = run_trimig("migrate", uri, "--json", "--warmup", "0.2", *GUEST_OPTIONS)
            out, err = incoming.communicate(timeout=DEADLINE)
        finally:
            if incoming.poll() is None:
                incoming.kill()
            incoming.communicate()
    # The source: failed with the destination's verdict, exit status 1, its guest running.
    assert migrate.returncode == 1, (migrate.stdout, migrate.stderr)
    source = one_json_object(migrate.stdout)
    assert source["status"] == "failed", source
    assert VERDICT in source["error-desc"], source
    assert source["ram"]["total"] == GUEST_RAM
    assert source["guest"] == {"running": True, "dirty-tracked": False}, source
    error = migrate.stderr.strip().splitlines()[-1]
    assert error.startswith("trimig: error: migration to ") and VERDICT in error, migrate.stderr
    assert "Traceback" not in migrate.stderr
    # The destination: failed naming its guest's refusal, on stderr and in its JSON.
    assert incoming.returncode == 1, err
    destination = one_json_object(out)
    assert destination["status"] == "failed", destination
    assert REFUSAL in destination["error-desc"], destination
    assert destination["verified"] is False
    errors = [line for line in err.splitlines() if line.startswith("trimig: error: ")]
    assert len(errors) == 1 and REFUSAL in errors[0], err
    assert "Traceback" not in err
