"""CPU seconds of the engines of bench/vs_qemu.py, from /proc (and of this process's children)."""

from __future__ import annotations

import os

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as stat:
            text = stat.read()
    except OSError:  # gone meanwhile
        return None
    return text[text.rindex(")") + 2 :].split()


def _seconds(fields: list[str], children: bool = True) -> float:
    # after "(comm) ": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICK


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(f"/proc/{name}/stat")
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_cpu(pid: int, kind: str) -> dict[str, float]:
    """CPU seconds so far: ``all`` (the process, its live descendants, reaped children) and
    ``engine`` (without the guest: QEMU's vCPU threads, trimig's guest process)."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return {"all": float("nan"), "engine": float("nan")}
    own = _seconds(fields)
    total = own
    for child in descendants(pid):
        child_fields = _stat_fields(f"/proc/{child}/stat")
        if child_fields is not None:
            total += _seconds(child_fields)
    engine = own
    if kind == "qemu":
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                    name = comm.read().strip()
            except OSError:
                continue
            task = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            if name.startswith("CPU ") and task is not None:
                engine -= _seconds(task, children=False)
    return {"all": total, "engine": engine}


def children_cpu() -> float:
    """CPU of this process's reaped children (and theirs) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
