"""Throttling a guest process's CPU: a cgroup of its own with a CPU quota, or signals.

:func:`open_cpu_cgroup` moves a process into a new cgroup beside its own where the kernel
and permissions allow (cgroup v2 ``cpu.max``, else the v1 ``cpu`` controller's
``cpu.cfs_quota_us``) and returns a :class:`CpuCgroup`; None where it cannot. Without one
:func:`stop_process` / :func:`continue_process` (SIGSTOP / SIGCONT) make a duty cycle.
Synchronous and trio-free.
"""

from __future__ import annotations

import contextlib
import os
import signal

CGROUP_ROOT = "/sys/fs/cgroup"
#: The quota period, in microseconds (the kernel's default, 100 ms).
PERIOD_US = 100_000


class CpuCgroup:
    """A cgroup holding one process, whose CPU time is capped by :meth:`set_share`."""

    def __init__(self, path: str, pid: int, previous: str, version: int) -> None:
        self.path = path
        self.pid = pid
        self._previous = previous  # the cgroup directory the process came from
        self.version = version

    def set_share(self, percent: int) -> None:
        """Let the process run ``percent`` % of one CPU (100: no cap)."""
        quota = PERIOD_US * max(1, percent) // 100
        if self.version == 2:
            value = "max" if percent >= 100 else f"{quota} {PERIOD_US}"
            _write(os.path.join(self.path, "cpu.max"), f"{value}\n")
        else:
            _write(os.path.join(self.path, "cpu.cfs_period_us"), f"{PERIOD_US}\n")
            _write(
                os.path.join(self.path, "cpu.cfs_quota_us"), f"{-1 if percent >= 100 else quota}\n"
            )

    def close(self) -> None:
        """Lift the cap, move the process back where it was and remove the cgroup (a gone
        process is fine)."""
        with contextlib.suppress(OSError):
            self.set_share(100)
        with contextlib.suppress(OSError):  # ESRCH: it exited
            _write(os.path.join(self._previous, "cgroup.procs"), f"{self.pid}\n")
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/PID/cgroup`` as {controller list ("" for v2): path}."""
    found = {}
    with open(f"/proc/{pid}/cgroup") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            found[controllers] = path
    return found


def _is_cgroup2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def _cgroup2_mount(root: str) -> str | None:
    """The cgroup v2 hierarchy: ``root`` itself (unified), or ``root/unified`` (the hybrid
    layout, v1 controllers beside it)."""
    for mount in (root, os.path.join(root, "unified")):
        if _is_cgroup2(mount):
            return mount
    return None


def open_cpu_cgroup(
    pid: int, name: str, *, root: str = CGROUP_ROOT, versions: tuple[int, ...] = (2, 1)
) -> CpuCgroup | None:
    """Move ``pid`` into a new cgroup ``name`` beside its own with a CPU controller, or
    None where that cannot be done (no controller, no permission, read-only cgroupfs).
    Tries the cgroup ``versions`` in order: v2 needs the ``cpu`` controller enabled in the
    parent's ``cgroup.subtree_control`` (a hybrid system may have bound it to v1)."""
    try:
        groups = _cgroup_of(pid)
    except OSError:
        return None
    candidates: list[tuple[str, str, int]] = []
    unified = _cgroup2_mount(root)
    if unified is not None and "" in groups:
        candidates.append((unified, groups[""], 2))
    for controllers, path in groups.items():
        if "cpu" in controllers.split(","):
            mount = os.path.join(root, controllers)
            if not os.path.isdir(mount):
                mount = os.path.join(root, "cpu")
            candidates.append((mount, path, 1))
    candidates = [c for version in versions for c in candidates if c[2] == version]
    for mount, path, version in candidates:
        parent = os.path.join(mount, path.lstrip("/"))
        if version == 2:
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as file:
                    if "cpu" not in file.read().split():
                        continue
            except OSError:
                continue
        elif not os.path.exists(os.path.join(parent, "cpu.cfs_quota_us")):
            continue
        child = os.path.join(parent, name)
        try:
            os.mkdir(child)
        except OSError:
            continue
        try:
            _write(os.path.join(child, "cgroup.procs"), f"{pid}\n")
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(child)
            continue
        return CpuCgroup(child, pid, parent, version)
    return None


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` (a gone process is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)


def continue_process(pid: int) -> None:
    """SIGCONT ``pid`` (a gone process is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (R, S, T for stopped, ...); "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def cgroup_paths(pid: int) -> dict[str, str]:
    """The cgroups ``pid`` is in (for checks that a throttle left nothing behind)."""
    try:
        return _cgroup_of(pid)
    except OSError:
        return {}
