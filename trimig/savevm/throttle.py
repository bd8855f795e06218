"""The source's convergence helpers: auto-converge's CPU throttle and dirty-limit.

:class:`GuestThrottle` slows the guest process for real: in a cgroup of its own with a
CPU quota where the engine can make one (``kernel/throttle.py``), else by a SIGSTOP /
SIGCONT duty cycle over ``DUTY_PERIOD``. It is owned by a task of the migration's
nursery (:meth:`GuestThrottle.run`), so however the migration ends (completed, failed,
cancelled, an engine error) the task's end lifts it: SIGCONT, or the process moved back
out of the cgroup and the cgroup removed. The migration also lifts it (:meth:`lift`)
before it stops the guest to switch over.

:class:`DirtyLimit` asks the guest, through the guest protocol's ``set-dirty-limit``, to
dirty at most ``vcpu-dirty-limit`` MB/s; a guest program that does not support it says
so, and the migration goes on without (``x-dirty-limit-unsupported``).
"""

from __future__ import annotations

import logging

import trio

from ..errors import GuestError
from ..guest.host import GuestProcess
from ..kernel.throttle import CpuCgroup, continue_process, open_cpu_cgroup, stop_process
from ..migration import MigrationCapabilities, MigrationParameters, SourceStats
from .convergence import ThrottleSettings, ThrottleStep, next_throttle

log = logging.getLogger("trimig.savevm.throttle")

#: One SIGSTOP/SIGCONT cycle: the guest is stopped ``percentage`` % of it.
DUTY_PERIOD = 0.1
#: QEMU's dirty ring holds 4096 entries by default (dirty-limit-ring-full-time).
DIRTY_RING_PAGES = 4096


class GuestThrottle:
    """auto-converge: the guest process's CPU throttle, decided after each pass."""

    def __init__(
        self,
        pid: int,
        settings: ThrottleSettings,
        *,
        use_cgroup: bool = True,
        cgroup_versions: tuple[int, ...] = (2, 1),
    ) -> None:
        self.pid = pid
        self.settings = settings
        self.percentage = 0
        self._high_passes = 0
        self._use_cgroup = use_cgroup
        self._cgroup_versions = cgroup_versions
        self._changed = trio.Event()
        self._lifted = False
        self._cgroup: CpuCgroup | None = None
        #: "cgroup-v2", "cgroup-v1" or "signals" once the task runs.
        self.method = ""

    def after_pass(self, *, dirtied: int, sent: int) -> int:
        """Decide the throttle after a pass that dirtied and sent these many bytes."""
        if self._lifted:
            return 0
        step: ThrottleStep = next_throttle(
            percentage=self.percentage,
            high_passes=self._high_passes,
            dirtied=dirtied,
            sent=sent,
            settings=self.settings,
        )
        self._high_passes = step.high_passes
        if step.percentage != self.percentage:
            log.info("auto-converge: throttling the guest %d%%", step.percentage)
            self.percentage = step.percentage
            self._changed.set()
        return self.percentage

    async def lift(self) -> None:
        """Stop throttling for good (before the guest is stopped for the switch-over);
        returns once the guest runs unthrottled."""
        self._lifted = True
        self.percentage = 0
        self._changed.set()
        if self._cgroup is not None:
            self._cgroup.set_share(100)
        continue_process(self.pid)
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply the throttle until cancelled; the guest is unthrottled when this ends."""
        cgroup: CpuCgroup | None = None
        try:
            if self._use_cgroup:
                cgroup = self._cgroup = open_cpu_cgroup(
                    self.pid, f"trimig-throttle-{self.pid}", versions=self._cgroup_versions
                )
            self.method = f"cgroup-v{cgroup.version}" if cgroup else "signals"
            task_status.started()
            if cgroup is not None:
                await self._run_cgroup(cgroup)
            else:
                await self._run_signals()
        finally:
            continue_process(self.pid)
            if cgroup is not None:
                self._cgroup = None
                cgroup.close()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    async def _run_cgroup(self, cgroup: CpuCgroup) -> None:
        while True:
            cgroup.set_share(100 - self.percentage)
            await self._wait_for_change()

    async def _run_signals(self) -> None:
        while True:
            percentage = self.percentage
            if percentage == 0:
                await self._wait_for_change()
                continue
            stop_process(self.pid)
            try:
                with trio.move_on_after(DUTY_PERIOD * percentage / 100):
                    await self._wait_for_change()  # a change (a lift) ends the stop at once
            finally:
                continue_process(self.pid)
            await trio.sleep(DUTY_PERIOD * (100 - percentage) / 100)


class DirtyLimit:
    """dirty-limit: the guest limits its own dirty rate once precopy does not converge."""

    def __init__(self, guest: GuestProcess, megabytes_per_second: int, period_ms: int) -> None:
        self.guest = guest
        self.limit = megabytes_per_second * 1_000_000
        self.period_ms = period_ms
        self.active = False
        self.unsupported = False
        self._high_passes = 0
        self._throttle_us = 0
        self._rounds = 0
        #: dirty-limit-throttle-time-per-round: us the guest slept per period.
        self.throttle_time_per_round = 0

    async def after_pass(self, *, dirtied: int, sent: int, elapsed: float) -> None:
        """After a pass: turn the limit on (as auto-converge's trigger: dirtied more than
        half what was sent, twice), and read how long the guest slept for it."""
        if self.unsupported:
            return
        if not self.active:
            step = next_throttle(
                percentage=0,
                high_passes=self._high_passes,
                dirtied=dirtied,
                sent=sent,
                settings=ThrottleSettings(),
            )
            self._high_passes = step.high_passes
            if step.percentage:
                await self._set(self.limit)
            return
        try:
            status = await self.guest.query()
        except GuestError:
            return
        total = int(status.get("dirty-limit-throttle-us") or 0)
        rounds = max(1.0, elapsed * 1000 / self.period_ms)
        self.throttle_time_per_round = int((total - self._throttle_us) / rounds)
        self._throttle_us = total

    async def _set(self, limit: int) -> None:
        try:
            await self.guest.set_dirty_limit(limit)
        except GuestError as exc:
            log.warning("dirty-limit: the guest cannot limit its dirty rate: %s", exc)
            self.unsupported = True
            return
        self.active = bool(limit)

    async def lift(self) -> None:
        if self.active:
            self.active = False
            await self._set(0)

    @property
    def ring_full_time_us(self) -> int:
        """dirty-limit-ring-full-time: us the guest needs at the limit to dirty a ring of
        DIRTY_RING_PAGES pages (QEMU's dirty ring), 0 when the limit is off."""
        if not self.active or not self.limit:
            return 0
        return int(DIRTY_RING_PAGES * 4096 / self.limit * 1_000_000)


class ConvergenceAids:
    """What a migration's capabilities ask for to help precopy converge (auto-converge,
    dirty-limit), behind the four calls OutgoingMigration makes."""

    def __init__(
        self,
        guest: GuestProcess,
        capabilities: MigrationCapabilities,
        parameters: MigrationParameters,
    ) -> None:
        self.throttle: GuestThrottle | None = None
        self.dirty_limit: DirtyLimit | None = None
        if capabilities.auto_converge:
            settings = ThrottleSettings(
                trigger_threshold=parameters.throttle_trigger_threshold,
                initial=parameters.cpu_throttle_initial,
                increment=parameters.cpu_throttle_increment,
                tailslow=parameters.cpu_throttle_tailslow,
                maximum=parameters.max_cpu_throttle,
            )
            self.throttle = GuestThrottle(guest.pid, settings)
        if capabilities.dirty_limit:
            self.dirty_limit = DirtyLimit(
                guest, parameters.vcpu_dirty_limit, parameters.x_vcpu_dirty_limit_period
            )

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the throttle's task in the migration's nursery (it ends with it)."""
        if self.throttle is not None:
            await nursery.start(self.throttle.run)

    async def after_pass(
        self, *, dirtied: int, sent: int, elapsed: float, stats: SourceStats
    ) -> None:
        if self.throttle is not None:
            stats.cpu_throttle_percentage = self.throttle.after_pass(dirtied=dirtied, sent=sent)
        if self.dirty_limit is not None:
            limit = self.dirty_limit
            await limit.after_pass(dirtied=dirtied, sent=sent, elapsed=elapsed)
            stats.dirty_limit_active = limit.active
            stats.dirty_limit_unsupported = limit.unsupported
            stats.dirty_limit_throttle_time_per_round = limit.throttle_time_per_round
            stats.dirty_limit_ring_full_time = limit.ring_full_time_us

    def describe(self) -> str:
        """What is helping now, for the not-converging reason."""
        if self.throttle is not None and self.throttle.percentage:
            return f"auto-converge throttles the guest {self.throttle.percentage}%"
        if self.dirty_limit is not None and self.dirty_limit.active:
            return f"dirty-limit holds the guest to {self.dirty_limit.limit // 1_000_000} MB/s"
        if self.throttle is not None:
            return "auto-converge will throttle the guest after two such passes"
        if self.dirty_limit is not None:
            if self.dirty_limit.unsupported:
                return "dirty-limit is on but the guest program does not support it"
            return "dirty-limit will limit the guest after two such passes"
        return ""

    async def lift(self, stats: SourceStats | None = None) -> None:
        """End every aid: the guest runs at full speed again (before it is stopped for the
        switch-over, and after a failure)."""
        if self.throttle is not None:
            await self.throttle.lift()
        if self.dirty_limit is not None:
            await self.dirty_limit.lift()
        if stats is not None:
            stats.cpu_throttle_percentage = 0
            stats.dirty_limit_active = False
