"""Pieces shared by the precopy end-to-end tests (tests/test_precopy_*.py).

Everything is real: guests are processes running the built-in workload, streams cross
real transports, destinations are ``IncomingMigration`` objects in this trio run or
``trimig`` processes. Every wait is bounded (DEADLINE) so a broken migration fails
instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import numpy as np
import trio

from trimig.demo import running_guest, transport_uris
from trimig.guest.host import GuestProcess, Verdict, workload_command
from trimig.loadvm.incoming import IncomingMigration
from trimig.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from trimig.ram_blocks import RamBlock, RamBlockSpec, default_block_specs
from trimig.savevm.outgoing import OutgoingMigration

MiB = 1 << 20
#: Every guest of the precopy suite has this much RAM (the issue asks for >= 64 MiB).
GUEST_RAM = 64 * MiB
#: A moderate dirty rate: the guest dirties for real, precopy still converges quickly.
DIRTY_RATE = "32M"
GUEST_COMMAND = workload_command(dirty_rate=DIRTY_RATE)
#: No single wait of a test may take longer than this (seconds).
DEADLINE = 30.0
#: How long a running guest may take to change its memory at all (a loaded machine can
#: leave its process unscheduled for a while; a stopped guest never changes it).
CHANGE_TIMEOUT = 5.0
#: The ``trimig`` command line, run as a real process.
TRIMIG = [sys.executable, "-m", "trimig.cli"]

#: The query-migrate names `trimig demo --json` must report, at top level and under "ram".
QUERY_MIGRATE_NAMES = ("status", "total-time", "downtime", "setup-time")
QUERY_MIGRATE_RAM_NAMES = (
    "transferred",
    "remaining",
    "total",
    "duplicate",
    "normal",
    "dirty-pages-rate",
    "mbps",
    "dirty-sync-count",
)


def guest_specs(*, huge: int = 0) -> list[RamBlockSpec]:
    """The built-in guest's layout with GUEST_RAM of ``pc.ram`` (plus ``pc.huge``)."""
    return default_block_specs(GUEST_RAM, huge=huge)


def counter_sum(blocks: Sequence[RamBlock]) -> int:
    """The sum of the workload's page counters, read through the engine's own mappings.

    The workload adds 1 to page counters as it runs, so this grows while the guest runs
    and stands still while it is stopped."""
    return sum(int(block.pages.view("<u8")[:, 0].sum(dtype=np.uint64)) for block in blocks)


async def assert_runs_undisturbed(guest: GuestProcess, blocks: Sequence[RamBlock]) -> None:
    """The guest runs as if no migration had been tried: the handle and the guest itself
    say running, dirty tracking is off, and its memory keeps changing."""
    assert guest.running
    assert guest.returncode is None
    status = await guest.query()
    assert status["running"] is True, status
    assert status["dirty_tracked"] is False, status
    await wait_for_change(blocks)
    await wait_for_change(blocks)  # and again: it goes on changing


async def wait_for_change(blocks: Sequence[RamBlock]) -> None:
    """Wait until the page counters in ``blocks`` grow (at most CHANGE_TIMEOUT)."""
    before = counter_sum(blocks)
    with trio.move_on_after(CHANGE_TIMEOUT):
        while counter_sum(blocks) == before:
            await trio.sleep(0.01)
    after = counter_sum(blocks)
    assert after > before, f"the guest's memory did not change in {CHANGE_TIMEOUT:g} s"


@attrs.define
class Destination:
    """An IncomingMigration listening in this trio run; outcomes are kept as values."""

    incoming: IncomingMigration
    connect_uri: str = ""
    connect_options: dict[str, Any] = attrs.field(factory=dict)
    error: BaseException | None = None
    finished: trio.Event = attrs.field(factory=trio.Event)

    async def wait_finished(self) -> MigrationStatus:
        """Wait (bounded) until the destination completed or failed; return its status."""
        with trio.fail_after(DEADLINE):
            await self.finished.wait()
        return self.incoming.status.value

    async def verify(self, run_after: float = 0.2) -> Verdict:
        """After completion: let the destination guest run, stop it and check its memory."""
        status = await self.wait_finished()
        assert status is MigrationStatus.COMPLETED, (status, self.error)
        guest = self.incoming.guest
        assert guest is not None
        with trio.fail_after(DEADLINE):
            await trio.sleep(run_after)
            assert counter_sum(self.incoming.blocks) > 0
            await guest.stop()
            return await guest.verify()


@asynccontextmanager
async def open_destination(
    specs: Sequence[RamBlockSpec],
    transport: str = "unix",
    *,
    capabilities: MigrationCapabilities | None = None,
    guest_command: Sequence[str] = GUEST_COMMAND,
) -> AsyncIterator[Destination]:
    """A destination listening on ``transport``; closed (guest, blocks) on exit."""
    async with transport_uris(transport) as (listen_uri, connect_template, options):
        incoming = IncomingMigration(
            specs,
            guest_command=list(guest_command),
            capabilities=capabilities,
            listen_options=options,
        )
        destination = Destination(incoming, connect_options=options)
        try:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(_serve, destination, listen_uri)
                destination.connect_uri = connect_template.format(address=address)
                yield destination
                nursery.cancel_scope.cancel()  # a destination nobody connected to
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(DEADLINE):
                await incoming.aclose()


async def _serve(destination: Destination, uri: str, *, task_status: trio.TaskStatus[str]) -> None:
    try:
        await destination.incoming.listen_and_run(uri, task_status=task_status)
    except Exception as exc:  # kept as a value
        destination.error = exc
    finally:
        destination.finished.set()


async def migrate(
    guest: GuestProcess,
    blocks: Sequence[RamBlock],
    destination: Destination,
    *,
    capabilities: MigrationCapabilities | None = None,
    parameters: MigrationParameters | None = None,
) -> OutgoingMigration:
    """Migrate ``guest`` to ``destination`` (bounded by DEADLINE); raises what run() raises."""
    outgoing = OutgoingMigration(
        guest,
        blocks,
        capabilities=capabilities,
        parameters=parameters,
        connect_options=destination.connect_options,
    )
    with trio.fail_after(DEADLINE):
        await outgoing.run(destination.connect_uri)
    return outgoing


async def migrate_and_verify(
    guest: GuestProcess, blocks: Sequence[RamBlock], transport: str = "unix"
) -> tuple[OutgoingMigration, Verdict]:
    """Migrate a running guest to a fresh destination with the same layout and verify it
    there. The source guest ends stopped (its copy now lives on the destination)."""
    specs = [block.spec for block in blocks]
    async with open_destination(specs, transport) as destination:
        outgoing = await migrate(guest, blocks, destination)
        verdict = await destination.verify()
    return outgoing, verdict


@asynccontextmanager
async def source_guest(
    specs: Sequence[RamBlockSpec] | None = None, warmup: float = 0.2
) -> AsyncIterator[tuple[GuestProcess, list[RamBlock]]]:
    """A running, dirtying source guest (GUEST_RAM) that has run ``warmup`` seconds."""
    async with running_guest(specs or guest_specs(), GUEST_COMMAND) as (guest, blocks):
        await trio.sleep(warmup)
        yield guest, blocks


def run_trimig(*arguments: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run ``trimig ARGUMENTS...`` as a real process; its output is returned as text."""
    return subprocess.run(
        [*TRIMIG, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def one_json_object(output: str) -> dict[str, Any]:
    """The single JSON object a ``--json`` command printed (and nothing else on stdout)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line of JSON on stdout, got {output!r}"
    value = json.loads(lines[0])
    assert isinstance(value, dict), value
    return value


def assert_query_migrate_names(info: dict[str, Any]) -> None:
    """``info`` has query-migrate's names for a completed migration, with sane values."""
    missing = [name for name in QUERY_MIGRATE_NAMES if name not in info]
    assert not missing, f"missing {missing} in {info}"
    ram = info.get("ram")
    assert isinstance(ram, dict), info
    missing = [name for name in QUERY_MIGRATE_RAM_NAMES if name not in ram]
    assert not missing, f"missing ram.{missing} in {info}"
    assert info["status"] == "completed"
    assert ram["remaining"] == 0
    assert ram["total"] >= GUEST_RAM
    assert ram["transferred"] >= ram["normal"] * 4096 > 0
    assert ram["dirty-sync-count"] >= 2  # at least the bulk pass and the final sync
    assert info["total-time"] >= info["setup-time"] >= 0
    assert info["downtime"] >= 0
