"""auto-converge and dirty-limit end to end: a guest dirtying as fast as it can over a
32 MiB/s link (max-bandwidth) completes precopy with either, and does not without (it is
cancelled at a deadline, query-migrate saying why); after every outcome the guest runs
unthrottled (not stopped by a signal, not in a throttle cgroup).

The guests: for auto-converge the adversarial guest flat out (each write costs CPU, so a
CPU throttle slows its dirtying); for dirty-limit the built-in workload flat out (it
touches one word per page: 22 million pages a second here, so even QEMU's largest throttle,
99 %, leaves it dirtying GiB/s: only a dirty limit tames it; docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import trio
from precopy_harness import MiB, counter_sum, open_destination

from trimig.demo import running_guest
from trimig.errors import MigrationFailed
from trimig.guest.host import GuestProcess, workload_command
from trimig.kernel.throttle import cgroup_paths, process_state
from trimig.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from trimig.ram_blocks import default_block_specs
from trimig.savevm.convergence import ThrottleSettings
from trimig.savevm.outgoing import OutgoingMigration
from trimig.savevm.throttle import GuestThrottle

RAM = 32 * MiB
LINK = 32 * MiB  # bytes/s
FLAT_OUT = workload_command(dirty_rate=0)  # as fast as it can
ADVERSARIAL_FLAT_OUT = [
    sys.executable,
    os.path.join(os.path.dirname(__file__), "guests", "adversarial.py"),
    "--rate",
    "0",
]
GUESTS = {"auto-converge": ADVERSARIAL_FLAT_OUT, "dirty-limit": FLAT_OUT}
#: Without help the migration is cancelled after this long (a pass takes ~1 s).
NO_HELP_DEADLINE = 6.0


def settings(capability: str | None) -> tuple[MigrationCapabilities, MigrationParameters]:
    capabilities = MigrationCapabilities()
    parameters = MigrationParameters()
    parameters.set("max-bandwidth", LINK)
    if capability == "auto-converge":
        capabilities.set("auto-converge", True)
        # Lean: start high and climb fast (QEMU's own test sets its own steps too).
        parameters.set("cpu-throttle-initial", 60)
        parameters.set("cpu-throttle-increment", 20)
    elif capability == "dirty-limit":
        capabilities.set("dirty-limit", True)
        parameters.set("vcpu-dirty-limit", 4)  # MB/s
    return capabilities, parameters


async def assert_unthrottled(guest: GuestProcess) -> None:
    """The guest's process runs freely: not stopped, in no trimig cgroup, and it dirties."""
    for _ in range(5):  # a state read mid-step may say R or S, never T
        assert process_state(guest.pid) != "T"
        await trio.sleep(0.05)
    assert not any("trimig-throttle" in path for path in cgroup_paths(guest.pid).values())


async def watch_throttle(outgoing: OutgoingMigration, seen: list[int]) -> None:
    while True:
        seen.append(int(outgoing.query().get("cpu-throttle-percentage", 0)))
        await trio.sleep(0.1)


@pytest.mark.parametrize("capability", ["auto-converge", "dirty-limit"])
async def test_a_flat_out_guest_completes_with_help(capability: str) -> None:
    specs = default_block_specs(RAM)
    capabilities, parameters = settings(capability)
    command = GUESTS[capability]
    async with (
        running_guest(specs, command) as (guest, blocks),
        open_destination(specs, guest_command=command) as destination,
    ):
        await trio.sleep(0.2)
        outgoing = OutgoingMigration(
            guest,
            blocks,
            capabilities=capabilities,
            parameters=parameters,
            connect_options=destination.connect_options,
        )
        seen: list[int] = []
        infos: list[dict] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_throttle, outgoing, seen)

            async def keep_info() -> None:
                while True:
                    infos.append(outgoing.query())
                    await trio.sleep(0.2)

            nursery.start_soon(keep_info)
            with trio.fail_after(60):
                await outgoing.run(destination.connect_uri)
            nursery.cancel_scope.cancel()
        assert outgoing.status.value is MigrationStatus.COMPLETED
        verdict = await destination.verify()
        assert verdict.verified, verdict.detail
        if capability == "auto-converge":
            assert max(seen) >= 60  # it throttled for real
            method = outgoing._aids.throttle.method if outgoing._aids.throttle else ""
            assert method in ("cgroup-v1", "cgroup-v2", "signals")
        else:
            assert any("dirty-limit-ring-full-time" in info for info in infos)
        # The source guest is stopped (it moved), but not by a throttle's SIGSTOP alone:
        # it is in no throttle cgroup and continuing it lets it run.
        assert not any("trimig-throttle" in p for p in cgroup_paths(guest.pid).values())
        await guest.cont()
        await assert_unthrottled(guest)


@pytest.mark.parametrize("guest_name", ["auto-converge", "dirty-limit"])
async def test_without_help_it_does_not_converge_and_says_why(guest_name: str) -> None:
    specs = default_block_specs(RAM)
    capabilities, parameters = settings(None)
    command = GUESTS[guest_name]  # the same guests, without the capability
    async with (
        running_guest(specs, command) as (guest, blocks),
        open_destination(specs, guest_command=command) as destination,
    ):
        outgoing = OutgoingMigration(
            guest,
            blocks,
            capabilities=capabilities,
            parameters=parameters,
            connect_options=destination.connect_options,
        )
        with trio.move_on_after(NO_HELP_DEADLINE) as bound:
            await outgoing.run(destination.connect_uri)
        assert bound.cancelled_caught  # still not converged at the deadline
        info = outgoing.query()
        assert info["status"] == "cancelled"
        assert "MiB/s" in info["x-not-converging"] and "downtime limit" in info["x-not-converging"]
        assert "auto-converge, dirty-limit, postcopy" in info["x-not-converging"]
        assert info["ram"]["dirty-pages-rate"] > 0
        assert "expected-downtime" in info
        assert guest.running
        await assert_unthrottled(guest)


@pytest.mark.parametrize("outcome", ["cancelled", "failed"])
async def test_the_throttle_is_lifted_when_the_migration_does_not_complete(
    outcome: str,
) -> None:
    specs = default_block_specs(RAM)
    capabilities, parameters = settings("auto-converge")
    parameters.set("downtime-limit", 0)  # never converges: the throttle climbs to the top
    async with (
        running_guest(specs, FLAT_OUT) as (guest, blocks),
        open_destination(specs, guest_command=FLAT_OUT) as destination,
    ):
        outgoing = OutgoingMigration(
            guest,
            blocks,
            capabilities=capabilities,
            parameters=parameters,
            connect_options=destination.connect_options,
        )
        async with trio.open_nursery() as nursery:

            async def end_it() -> None:
                with trio.fail_after(30):
                    while outgoing.query().get("cpu-throttle-percentage", 0) < 80:
                        await trio.sleep(0.05)
                if outcome == "cancelled":
                    nursery.cancel_scope.cancel()
                else:  # the destination goes away: the migration fails
                    assert destination.incoming.guest is not None
                    os.kill(destination.incoming.guest.pid, 9)
                    await destination.incoming.aclose()

            nursery.start_soon(end_it)
            with contextlib.suppress(MigrationFailed):
                await outgoing.run(destination.connect_uri)
        assert outgoing.status.value.value == outcome
        assert "cpu-throttle-percentage" not in outgoing.query()
        assert guest.running
        before = counter_sum(blocks)
        await assert_unthrottled(guest)
        await trio.sleep(0.3)
        assert counter_sum(blocks) > before


@pytest.mark.parametrize("method", ["signals", "cgroup-v1", "cgroup-v2"])
async def test_each_throttle_method_slows_the_guest_and_lets_go(method: str) -> None:
    """The SIGSTOP/SIGCONT duty cycle and the cgroup quotas (v1 cpu.cfs_quota_us, v2
    cpu.max) each cut the guest's progress, and cancelling the throttle's task leaves it
    running freely, its cgroup removed. A cgroup version this machine cannot give (v2
    needs the cpu controller in the unified hierarchy; a hybrid system may bind it to v1)
    is skipped, naming why."""
    specs = default_block_specs(RAM)
    versions = (int(method[-1]),) if method.startswith("cgroup") else ()
    async with running_guest(specs, ADVERSARIAL_FLAT_OUT) as (guest, _blocks):
        throttle = GuestThrottle(
            guest.pid,
            ThrottleSettings(initial=90),
            use_cgroup=bool(versions),
            cgroup_versions=versions,
        )
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(throttle.run)
                if throttle.method != method:
                    assert versions and throttle.method == "signals", throttle.method
                    scope.cancel()
                    pytest.skip(f"no {method} cgroup with the cpu controller here: {_why()}")
                cgroup = throttle._cgroup
                assert cgroup is None or any(
                    cgroup.path.endswith(path) for path in cgroup_paths(guest.pid).values()
                )
                ticks = {}
                for percentage in (0, 90):
                    throttle.percentage = percentage
                    throttle._changed.set()
                    await trio.sleep(0.3)
                    start = _cpu_ticks(guest.pid)
                    await trio.sleep(1.0)
                    ticks[percentage] = _cpu_ticks(guest.pid) - start
                assert ticks[90] < ticks[0] / 3, ticks
                scope.cancel()
        await assert_unthrottled(guest)
        assert cgroup is None or not os.path.exists(cgroup.path)
        start = _cpu_ticks(guest.pid)
        await trio.sleep(0.5)
        assert _cpu_ticks(guest.pid) > start


def _why() -> str:
    """Where the cpu controller is, for a skip's reason."""
    with open("/proc/cgroups") as file:
        cpu = [line.split() for line in file if line.startswith("cpu\t")]
    hierarchy = cpu[0][1] if cpu else "?"
    mounts = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
    unified = [m for m in mounts if os.path.exists(f"{m}/cgroup.controllers")]
    controllers: list[str] = []
    if unified:
        with open(f"{unified[0]}/cgroup.controllers") as file:
            controllers = file.read().split()
    return (
        f"/proc/cgroups puts cpu in hierarchy {hierarchy} (0 is v2); the cgroup2 mount "
        f"{unified[0] if unified else '(none)'} offers {controllers}"
    )


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
