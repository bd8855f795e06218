"""Watching a process that is not a child of ours: pidfd_open(2)."""

from __future__ import annotations

import errno
import os

from ..errors import KernelError


def open_parent_pidfd() -> int:
    """A pidfd of this process's parent: it becomes readable once the parent has exited
    (whichever of its threads started us, unlike PR_SET_PDEATHSIG). The caller closes it.

    Raises KernelError (ESRCH) if the parent has exited already (we were reparented), or
    if pidfd_open fails."""
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except OSError as exc:
        raise KernelError("pidfd_open", exc.errno or errno.EINVAL, f"parent {parent}") from exc
    if os.getppid() != parent:  # it exited before the pidfd was opened: ours is of a reaper
        os.close(pidfd)
        raise KernelError("pidfd_open", errno.ESRCH, f"parent {parent} has exited")
    return pidfd
