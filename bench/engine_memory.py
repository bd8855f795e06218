"""The engines' memory, from /proc/PID/status, sampled while a migration runs.

bench/vs_qemu.py reports per side the peak of the engine's *own* memory, RssAnon +
RssFile (what the engine allocated and the files it maps; not the guest RAM a trimig
engine maps from its memfd, counted as RssShmem), sampled at each query-migrate, and
VmHWM (the peak resident set, everything included) when the side reports completed.
QEMU's guest RAM is anonymous memory: its own figure includes the guest's RAM. issue 10's
budget for trimig's overhead is 3% of guest RAM + 64 MiB (the figure
bench/precopy.py reports too).
"""

from __future__ import annotations

MIB = 1 << 20
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory_status(pid: int) -> dict[str, int] | None:
    """The FIELDS of /proc/PID/status in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.readlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0]) * 1024  # kB
    return found


def overhead_budget(ram: int) -> int:
    """Bytes of engine memory allowed beyond the guest's RAM: 3% of it + 64 MiB."""
    return ram * 3 // 100 + 64 * MIB


class PeakMemory:
    """Per side (name -> pid): the peak of RssAnon + RssFile over the samples, and the
    VmHWM of the last sample."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.own: dict[str, int] = {}
        self.hwm: dict[str, int] = {}

    def sample(self, side: str | None = None) -> None:
        """Read each side's status (or only ``side``'s)."""
        for name, pid in self.pids.items():
            if side is not None and name != side:
                continue
            status = memory_status(pid)
            if status is None:
                continue
            own = status.get("RssAnon", 0) + status.get("RssFile", 0)
            self.own[name] = max(self.own.get(name, 0), own)
            self.hwm[name] = status.get("VmHWM", 0)

    def figures(self) -> dict[str, float]:
        """``{side}_own_peak_MiB`` and ``{side}_hwm_MiB`` for each side sampled."""
        figures = {}
        for name in self.own:
            figures[f"{name}_own_peak_MiB"] = round(self.own[name] / MIB, 1)
            figures[f"{name}_hwm_MiB"] = round(self.hwm[name] / MIB, 1)
        return figures
