"""Precopy end to end over every transport: a running, dirtying 64 MiB guest moves and
its copy on the destination verifies (every page consistent with its device state).

unix, tcp, exec and rdma (in-process, MemoryFabric) go through ``migrate_locally``, the
runner of ``trimig demo``; rdma:PATH crosses processes: the destination is a
``trimig incoming`` process, the source an OutgoingMigration here.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    GUEST_COMMAND,
    GUEST_RAM,
    TRIMIG,
    assert_query_migrate_names,
    guest_specs,
    migrate_and_verify,
    one_json_object,
    source_guest,
)

from trimig.demo import migrate_locally
from trimig.migration import TRANSPORT_NAMES, MigrationStatus
from trimig.savevm.outgoing import OutgoingMigration

HUGE = 32 << 20


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
async def test_running_guest_migrates_and_verifies(transport: str) -> None:
    with trio.fail_after(DEADLINE):
        result = await migrate_locally(
            guest_specs(), transport=transport, guest_command=GUEST_COMMAND, warmup=0.3
        )
    assert result.verdict is not None and result.verdict.verified, result.verdict
    assert result.ok
    assert result.destination["status"] == "completed"
    source = result.source
    assert_query_migrate_names(source)
    assert source["ram"]["total"] == GUEST_RAM
    # The guest really dirtied memory while it was being copied, and those pages went again.
    assert source["ram"]["dirty-pages-rate"] > 0
    assert source["ram"]["normal"] > GUEST_RAM // 4096
    # Its copy kept running on the destination: all pages checked, the sweep went on.
    raw = result.verdict.raw
    assert raw["page_count"] == GUEST_RAM // 4096
    assert (raw["memory_pass"], raw["memory_cursor"]) > (0, 0)


@pytest.mark.parametrize("transport", ["unix", "rdma"])
async def test_guest_with_a_hugetlb_block(transport: str, hugepages: object) -> None:
    """(The free huge page count is machine-wide, so it is not compared: the suite's leak
    check sees that no mapping of the blocks is left here.)"""
    specs = guest_specs(huge=HUGE)
    assert [(s.name, s.page_size) for s in specs] == [("pc.ram", 4096), ("pc.huge", 2 << 20)]
    with trio.fail_after(DEADLINE):
        result = await migrate_locally(
            specs, transport=transport, guest_command=GUEST_COMMAND, warmup=0.3
        )
    assert result.verdict is not None and result.verdict.verified, result.verdict
    assert result.ok
    assert result.verdict.raw["page_count"] == (GUEST_RAM + HUGE) // 4096
    assert result.source["ram"]["total"] == GUEST_RAM + HUGE


async def test_migration_of_an_already_migrated_guest() -> None:
    """The destination guest of one migration is the source of the next (two hops)."""
    async with source_guest() as (guest, blocks):
        outgoing, verdict = await migrate_and_verify(guest, blocks, "tcp")
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict


async def test_rdma_socket_to_a_destination_process() -> None:
    """rdma:PATH between processes: ``trimig incoming rdma:PATH`` receives from an
    OutgoingMigration in this process, then verifies its guest and exits 0."""
    with tempfile.TemporaryDirectory(prefix="tpr") as tmp:
        path = os.path.join(tmp, "rdma")
        command = [*TRIMIG, "incoming", "--ram", "64M", "--json", f"rdma:{path}"]
        with trio.fail_after(DEADLINE):
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                assert process.stderr is not None and process.stdout is not None
                stderr = b""
                while b"listening on" not in stderr:
                    chunk = await process.stderr.receive_some()
                    assert chunk, f"trimig incoming exited early: {stderr!r}"
                    stderr += chunk
                async with source_guest() as (guest, blocks):
                    outgoing = OutgoingMigration(guest, blocks)
                    await outgoing.run(f"rdma:{path}")
                    assert outgoing.status.value is MigrationStatus.COMPLETED
                    assert outgoing.query()["ram"]["total"] == GUEST_RAM
                stdout = b""
                async with trio.open_nursery() as nursery:

                    async def drain_stderr() -> None:
                        nonlocal stderr
                        assert process.stderr is not None
                        while chunk := await process.stderr.receive_some():
                            stderr += chunk

                    nursery.start_soon(drain_stderr)
                    while chunk := await process.stdout.receive_some():
                        stdout += chunk
                assert await process.wait() == 0, stderr.decode(errors="replace")
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
                    for pipe in (process.stdout, process.stderr):
                        if pipe is not None:
                            await pipe.aclose()
    info = one_json_object(stdout.decode())
    assert info["status"] == "completed"
    assert info["verified"] is True, info
    assert info["verdict"]["page_count"] == GUEST_RAM // 4096
