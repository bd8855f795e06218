"""Postcopy end to end: a running, dirtying guest moves over real transports.

Real processes (the built-in workload guest on both sides), the real kernel
(userfaultfd on the destination, WP-async dirty tracking on the source) and real
sockets. Each test migrates a few MiB; every wait is bounded (harness DEADLINE), and
the suite's leak check (tests/conftest.py) runs around each test.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import trio
from postcopy_harness import (
    DEADLINE,
    Pair,
    assert_completed_and_verified,
    pages_differing,
    postcopy_settings,
    read_block,
    run_pair,
)

from trimig.demo import running_guest
from trimig.errors import ConfigError, MigrationFailed
from trimig.guest.host import workload_command
from trimig.guest.workload import workload_arguments
from trimig.kernel import HUGE_PAGE_SIZE
from trimig.migration import MigrationStatus
from trimig.ram_blocks import RamBlockSpec, default_block_specs
from trimig.savevm.outgoing import OutgoingMigration

RAM = 8 << 20
#: Where the destination guest must fault: RAM that outgrows what the socket buffers and
#: the background stream's first unthrottled 4 MiB can bring before the guest runs there,
#: streamed at 4 MB/s after that (requests jump the queue).
FAULTING_RAM = 16 << 20
SLOW_STREAM = {"max_postcopy_bandwidth": "4M"}
#: A destination guest that never writes (one byte of pages per second): its memory after
#: postcopy is exactly what arrived, so it can be compared with the source byte for byte.
IDLE_GUEST = workload_command(dirty_rate=1)

# -- transports, with and without the urgent channel ----------------------------------


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
@pytest.mark.parametrize("transport", ["tcp", "unix", "rdma"])
async def test_postcopy_of_a_guest_that_must_fault(transport: str, preempt: bool) -> None:
    """Every page is dirty at the switch (maximal dirty rate) and the background stream is
    slow, so the destination guest, sweeping its whole RAM at once, touches pages long
    before the stream brings them: it faults, and each fault is a request."""
    capabilities, parameters = postcopy_settings(preempt=preempt, **SLOW_STREAM)
    pair = await run_pair(
        default_block_specs(FAULTING_RAM),
        transport=transport,
        capabilities=capabilities,
        parameters=parameters,
        source_command=workload_command(dirty_rate="max"),
    )
    assert_completed_and_verified(pair)
    source = pair.outgoing.query()["ram"]
    destination = pair.incoming.query()
    assert destination["postcopy-requests"] > 0
    # Every request the destination sent reached the source (random fill: no zero holes
    # that the destination would place itself).
    assert source["postcopy-requests"] == destination["postcopy-requests"]
    # Requests completed, so latency was measured; the guest was blocked meanwhile.
    assert sum(destination["postcopy-latency-dist"]) > 0
    assert destination["postcopy-latency"] > 0
    assert destination["postcopy-vcpu-blocktime"] == [destination["postcopy-blocktime"]]
    if preempt:  # the requested pages came on the second connection
        assert pair.urgent_connections == 1
        assert pair.urgent_bytes_received > 0
    else:
        assert pair.urgent_connections == 0


async def test_postcopy_over_exec_is_refused_at_setup() -> None:
    """exec has no return path: refused before any byte of RAM moves; the guest runs on."""
    capabilities, parameters = postcopy_settings()
    statuses: list[str] = []
    with trio.fail_after(DEADLINE):
        async with running_guest(default_block_specs(RAM), workload_command()) as (guest, blocks):
            outgoing = OutgoingMigration(
                guest,
                blocks,
                capabilities=capabilities,
                parameters=parameters,
                on_event=lambda name, info: statuses.append(info.get("status", name)),
            )
            with pytest.raises(MigrationFailed, match="no return path") as failure:
                await outgoing.run("exec:cat > /dev/null")
            assert isinstance(failure.value.__cause__, ConfigError)
            assert "postcopy-ram" in str(failure.value)
            assert statuses == ["setup", "failed"]
            assert outgoing.query()["ram"]["transferred"] == 0
            assert "return path" in outgoing.query()["error-desc"]
            # Still running, not tracked for dirty pages any more, and consistent.
            state = await guest.query()
            assert state["running"] is True
            await trio.sleep(0.1)
            await guest.stop()
            assert (await guest.verify()).verified


# -- hugetlb ---------------------------------------------------------------------------


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
async def test_postcopy_with_a_hugetlb_block(hugepages: object, preempt: bool) -> None:
    specs = default_block_specs(FAULTING_RAM, huge=2 * HUGE_PAGE_SIZE)
    capabilities, parameters = postcopy_settings(preempt=preempt, **SLOW_STREAM)
    pair = await run_pair(specs, capabilities=capabilities, parameters=parameters)
    assert_completed_and_verified(pair)
    assert pair.incoming.query()["postcopy-requests"] > 0


async def test_hugetlb_block_arrives_byte_for_byte(hugepages: object) -> None:
    """With an idle destination guest, both sides' RAM, 2 MiB pages included, is equal
    after postcopy: canonicalised discards and whole host pages placed atomically."""
    specs = default_block_specs(RAM, huge=2 * HUGE_PAGE_SIZE)
    capabilities, parameters = postcopy_settings()

    def compare(pair: Pair) -> None:
        assert pair.incoming.status.value is MigrationStatus.COMPLETED
        for source, destination in zip(pair.source_blocks, pair.incoming.blocks, strict=True):
            differing = pages_differing(read_block(source), read_block(destination))
            assert len(differing) == 0, f"{source.name}: pages {differing[:8]} differ"

    pair = await run_pair(
        specs,
        capabilities=capabilities,
        parameters=parameters,
        dest_command=IDLE_GUEST,
        after=compare,
    )
    assert_completed_and_verified(pair)


# -- discard ---------------------------------------------------------------------------


async def test_rewritten_pages_arrive_in_their_new_version() -> None:
    """Pages the destination held from precopy and the guest rewrote before the switch are
    discarded and arrive again: after postcopy the destination holds the source's final
    version of each of them, not the one it had (checked page by page through the memfds
    of both engines; the destination guest is idle so nothing else changes its RAM)."""
    capabilities, parameters = postcopy_settings()
    checked: dict[str, int] = {}

    def compare(pair: Pair) -> None:
        assert pair.dest_snapshot_before_switch is not None
        assert pair.incoming.status.value is MigrationStatus.COMPLETED
        for index, (source, destination) in enumerate(
            zip(pair.source_blocks, pair.incoming.blocks, strict=True)
        ):
            final = read_block(source)  # frozen since the switch: the source guest is stopped
            before = pair.dest_snapshot_before_switch[index]  # all of precopy, loaded
            after = read_block(destination)
            pages_before = np.frombuffer(before, dtype=np.uint8).reshape(-1, 4096)
            assert pages_before.any(axis=1).all()  # random fill: every page was received
            stale = pages_differing(before, final)
            checked[source.name] = len(stale)
            wrong = np.intersect1d(stale, pages_differing(after, final))
            assert len(wrong) == 0, (
                f"{source.name}: pages {wrong[:8]} kept the version sent before the switch"
            )
            assert len(pages_differing(after, final)) == 0

    pair = await run_pair(
        [RamBlockSpec("pc.ram", RAM)],
        capabilities=capabilities,
        parameters=parameters,
        source_command=workload_command(dirty_rate="max"),
        dest_command=IDLE_GUEST,
        snapshot_dest_before_switch=True,
        after=compare,
    )
    assert_completed_and_verified(pair)
    # The guest rewrote pages after they had reached the destination (else this test
    # would check nothing): at the maximal dirty rate, every page.
    assert checked["pc.ram"] > RAM // 4096 // 2, checked


# -- a device load that touches RAM ----------------------------------------------------

GUESTS = os.path.join(os.path.dirname(__file__), "postcopy_guests.py")


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
async def test_device_state_load_that_faults(preempt: bool) -> None:
    """Loading the device state reads RAM that has not arrived (QEMU's reason to package
    the device state): the load faults before the guest runs, in postcopy-device, and the
    source serves those requests although it has no PONG(0x42) yet."""
    command = [sys.executable, GUESTS, "device-reads-ram", *workload_arguments(dirty_rate="max")]
    capabilities, parameters = postcopy_settings(preempt=preempt, **SLOW_STREAM)
    pair = await run_pair(
        default_block_specs(FAULTING_RAM),
        capabilities=capabilities,
        parameters=parameters,
        source_command=command,
    )
    assert_completed_and_verified(pair)
    assert pair.incoming.query()["postcopy-requests"] > 0


# -- the trigger -----------------------------------------------------------------------


async def test_start_postcopy_switches_a_running_precopy() -> None:
    """``start_postcopy()`` (migrate-start-postcopy) during a precopy that would take a
    while (bandwidth-capped) switches at the next slice, before the first pass ends."""
    capabilities, parameters = postcopy_settings(after_passes=0, max_bandwidth="16M")

    async def trigger(pair: Pair) -> None:
        await pair.outgoing.status.wait_value(MigrationStatus.ACTIVE)
        await trio.sleep(0.1)
        pair.outgoing.start_postcopy()

    pair = await run_pair(
        default_block_specs(RAM),
        capabilities=capabilities,
        parameters=parameters,
        control=trigger,
    )
    assert_completed_and_verified(pair)
    # 8 MiB at 16 MB/s is half a second of precopy: it switched long before the pass ended.
    assert pair.outgoing.query()["ram"]["dirty-sync-count"] == 1  # only the switch's sync


async def test_postcopy_enabled_but_never_triggered_completes_in_precopy() -> None:
    """postcopy-ram on, no trigger: ADVISE went out, yet precopy converges and completes
    (the destination drops its unused postcopy state), as in QEMU."""
    capabilities, parameters = postcopy_settings(after_passes=0)
    pair = await run_pair(
        default_block_specs(RAM),
        capabilities=capabilities,
        parameters=parameters,
        source_command=workload_command(dirty_rate="1M"),
    )
    assert pair.source_error is None and pair.dest_error is None
    assert pair.verdict is not None and pair.verdict.verified
    assert pair.source_statuses == ["setup", "active", "device", "completed"]
    assert pair.dest_statuses == ["setup", "active", "completed"]
    assert pair.outgoing.query()["ram"]["postcopy-bytes"] == 0
