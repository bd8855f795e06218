"""Cancelling a precopy migration: in setup, in an iteration, at the switch-over.

The scope running ``OutgoingMigration.run`` is cancelled at a moment picked from
``outgoing.status`` and ``stats.dirty_sync_count`` (a low max-bandwidth makes the passes
slow; a zero downtime-limit keeps precopy from converging before the cancel). Each time
the status ends ``cancelled``, the source guest runs on undisturbed (running, its memory
changing, dirty tracking undone), and a later migration of the same guest to a new
destination completes and verifies.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from precopy_harness import (
    DEADLINE,
    assert_runs_undisturbed,
    migrate_and_verify,
    open_destination,
    source_guest,
)

from trimig.errors import MigrationFailed
from trimig.migration import MigrationParameters, MigrationStatus
from trimig.savevm.outgoing import OutgoingMigration
from trimig.transports import ByteStream, listen

MiB = 1 << 20


def slow_parameters(max_bandwidth: str = "64M") -> MigrationParameters:
    """Passes limited to ``max_bandwidth``; downtime-limit 0: never converges by itself."""
    parameters = MigrationParameters()
    parameters.set("max-bandwidth", max_bandwidth)
    parameters.set("downtime-limit", 0)
    return parameters


@asynccontextmanager
async def draining_listener() -> AsyncIterator[str]:
    """A unix socket that accepts every connection and reads it to the end: a destination
    that never gets in the way. Yields its URI."""
    with tempfile.TemporaryDirectory(prefix="tpc", dir="/tmp") as tmp:
        async with await listen(f"unix:{tmp}/sock") as listener, trio.open_nursery() as nursery:

            async def drain(stream: ByteStream) -> None:
                buffer = memoryview(bytearray(1 << 20))
                try:
                    while await stream.receive_into(buffer):
                        pass
                finally:
                    await stream.aclose()

            async def accept_all() -> None:
                while True:
                    nursery.start_soon(drain, await listener.accept())

            nursery.start_soon(accept_all)
            yield f"unix:{tmp}/sock"
            nursery.cancel_scope.cancel()


async def run_cancelled(outgoing: OutgoingMigration, uri: str, scope: trio.CancelScope) -> None:
    """Run ``outgoing`` under ``scope``, which the test cancels; it must end cancelled."""
    with trio.fail_after(DEADLINE):
        with scope:
            await outgoing.run(uri)
        assert scope.cancelled_caught, f"the migration ended {outgoing.status.value} uncancelled"
    assert outgoing.status.value is MigrationStatus.CANCELLED
    assert outgoing.query()["status"] == "cancelled"


async def test_cancel_in_setup_at_many_points() -> None:
    """Cancel after 0, 1, 2, ... scheduling points of setup (connect, dirty tracking),
    again and again on the same guest: nothing is left over from any attempt."""
    in_setup = 0
    async with source_guest() as (guest, blocks), draining_listener() as uri:
        for checkpoints in (*range(0, 12), 15, 20, 30, 50):
            scope = trio.CancelScope()
            outgoing = OutgoingMigration(guest, blocks)

            async def cancel_after(
                checkpoints: int = checkpoints,
                outgoing: OutgoingMigration = outgoing,
                scope: trio.CancelScope = scope,
            ) -> None:
                nonlocal in_setup
                await outgoing.status.wait_value(MigrationStatus.SETUP)
                for _ in range(checkpoints):
                    if outgoing.status.value is not MigrationStatus.SETUP:
                        break
                    await trio.lowlevel.checkpoint()
                in_setup += outgoing.status.value is MigrationStatus.SETUP
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_after)
                await run_cancelled(outgoing, uri, scope)
            await assert_runs_undisturbed(guest, blocks)
        assert in_setup >= 5, f"only {in_setup} cancels landed in setup"
        outgoing, verdict = await migrate_and_verify(guest, blocks, "unix")
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict


def cancel_on_event(
    name: str, info: dict[str, Any] | None, scope: trio.CancelScope
) -> Callable[[str, dict[str, Any]], None]:
    """An on_event callback that cancels ``scope`` synchronously at that event."""

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == name and (info is None or data == info):
            scope.cancel()

    return on_event


@pytest.mark.parametrize(
    ("event", "info", "guest_was_stopped"),
    [
        pytest.param("MIGRATION", {"status": "setup"}, False, id="setup-starts"),
        pytest.param("MIGRATION", {"status": "active"}, False, id="first-iteration-starts"),
        pytest.param("MIGRATION_PASS", {"pass": 2}, False, id="after-second-pass"),
        pytest.param("STOP", None, True, id="guest-just-stopped-for-switch-over"),
    ],
)
async def test_cancel_at_an_event(
    event: str, info: dict[str, Any] | None, guest_was_stopped: bool
) -> None:
    """Cancelled synchronously from the migration's own event callback: exactly there."""
    async with source_guest() as (guest, blocks):
        specs = [block.spec for block in blocks]
        async with open_destination(specs, "unix") as destination:
            scope = trio.CancelScope()
            parameters = None if guest_was_stopped else slow_parameters("256M")
            outgoing = OutgoingMigration(
                guest,
                blocks,
                parameters=parameters,
                connect_options=destination.connect_options,
                on_event=cancel_on_event(event, info, scope),
            )
            await run_cancelled(outgoing, destination.connect_uri, scope)
            if info != {"status": "setup"}:  # the stream had started: it ends cut short
                await destination.wait_finished()
                assert destination.incoming.status.value is MigrationStatus.FAILED
                assert isinstance(destination.error, MigrationFailed)
                assert "truncated" in str(destination.error), destination.error
        await assert_runs_undisturbed(guest, blocks)
        outgoing, verdict = await migrate_and_verify(guest, blocks, "tcp")
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict


@pytest.mark.parametrize("moment", ["bulk-pass", "later-pass"])
async def test_cancel_during_an_iteration(moment: str) -> None:
    """Cancelled from outside while pages flow: in the bulk pass (no dirty sync yet) or in
    a later pass (after two syncs), picked from status and dirty_sync_count."""
    async with source_guest() as (guest, blocks):
        specs = [block.spec for block in blocks]
        async with open_destination(specs, "unix") as destination:
            scope = trio.CancelScope()
            outgoing = OutgoingMigration(
                guest,
                blocks,
                parameters=slow_parameters("64M"),
                connect_options=destination.connect_options,
            )
            seen: dict[str, Any] = {}

            async def cancel_in_iteration() -> None:
                await outgoing.status.wait_value(MigrationStatus.ACTIVE)
                while True:
                    syncs = outgoing.stats.dirty_sync_count
                    sent = outgoing.query()["ram"]["transferred"]
                    if moment == "bulk-pass" and syncs == 0 and sent >= 16 * MiB:
                        break
                    if moment == "later-pass" and syncs >= 2:
                        break
                    assert outgoing.status.value is MigrationStatus.ACTIVE
                    await trio.sleep(0.005)
                seen.update(status=outgoing.status.value, syncs=syncs, sent=sent)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_in_iteration)
                await run_cancelled(outgoing, destination.connect_uri, scope)
            assert seen["status"] is MigrationStatus.ACTIVE
            if moment == "bulk-pass":
                assert seen["syncs"] == 0 and seen["sent"] < 64 * MiB
            await destination.wait_finished()
            assert destination.incoming.status.value is MigrationStatus.FAILED
            assert "truncated" in str(destination.error), destination.error
        await assert_runs_undisturbed(guest, blocks)
        outgoing, verdict = await migrate_and_verify(guest, blocks, "unix")
        assert outgoing.status.value is MigrationStatus.COMPLETED
        assert verdict.verified, verdict
