"""The cgroup throttle's choice of hierarchy and the v2 files it writes, on a directory
laid out like a cgroupfs (logic only: the throttles themselves run for real in
tests/test_convergence_aids.py, v2 where the machine offers the cpu controller there)."""

from __future__ import annotations

import os
from pathlib import Path

from trimig.kernel.throttle import open_cpu_cgroup


def fake_hybrid(root: Path, own: str, *, cpu_in_v2: bool) -> Path:
    """A hybrid layout: tmpfs ``root`` with cgroup2 at ``root/unified``; the v2 parent
    cgroup is where /proc/self/cgroup says this process is (``own``)."""
    parent = root / "unified" / own.lstrip("/")
    parent.mkdir(parents=True, exist_ok=True)
    (root / "unified" / "cgroup.controllers").write_text("cpu hugetlb\n")
    (parent / "cgroup.procs").write_text("")
    (parent / "cgroup.subtree_control").write_text("cpu\n" if cpu_in_v2 else "hugetlb\n")
    return parent


def own_v2_path() -> str:
    with open("/proc/self/cgroup") as file:
        return next(line.split(":", 2)[2].strip() for line in file if line.startswith("0::"))


def test_v2_in_a_hybrid_layout_writes_cpu_max(tmp_path: Path) -> None:
    parent = fake_hybrid(tmp_path, own_v2_path(), cpu_in_v2=True)
    cgroup = open_cpu_cgroup(os.getpid(), "t", root=str(tmp_path), versions=(2,))
    assert cgroup is not None and cgroup.version == 2
    child = parent / "t"
    assert (child / "cgroup.procs").read_text() == f"{os.getpid()}\n"
    cgroup.set_share(30)
    assert (child / "cpu.max").read_text() == "30000 100000\n"
    cgroup.close()
    assert (child / "cpu.max").read_text() == "max\n"  # lifted before moving back
    assert (parent / "cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_v2_without_the_cpu_controller_is_not_used(tmp_path: Path) -> None:
    fake_hybrid(tmp_path, own_v2_path(), cpu_in_v2=False)
    assert open_cpu_cgroup(os.getpid(), "t", root=str(tmp_path), versions=(2,)) is None
