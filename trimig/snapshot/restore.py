"""``Restore``: one guest brought back from a mapped-ram snapshot, eagerly or lazily.

``await nursery.start(Restore(...).run)`` returns once the guest runs; ``run`` itself
returns once the restore is over (lazily: every data page placed). Time to first step is
measured from :attr:`Restore.start_ns` (``run`` entered: the file is not opened yet; the
guest process is already up, as QEMU's ``-incoming`` is) to the start of the guest's first
step after ``cont``, which the guest reports (``x-first-step`` in its ``query`` reply);
both are CLOCK_MONOTONIC, one clock for every process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import trio

from .._trio import open_nursery
from ..guest.host import GuestProcess
from ..ram_blocks import RamBlock, RamBlockSpec, create_blocks
from .eager import load_eagerly
from .file import open_snapshot
from .lazy import LazyRestore

#: How long a restored guest may take to report its first step (report()).
FIRST_STEP_TIMEOUT = 5.0


class Restore:
    """Restore ``path`` (a mapped-ram snapshot at ``offset``) into ``guest``, a guest
    process not attached yet. The blocks are created here and, once ``run`` returned,
    handed over with :meth:`take_blocks` (the caller closes them)."""

    def __init__(
        self,
        path: str,
        specs: Sequence[RamBlockSpec],
        guest: GuestProcess,
        *,
        offset: int = 0,
        lazy: bool = False,
    ) -> None:
        self.path = path
        self.offset = offset
        self.specs = list(specs)
        self.guest = guest
        self.lazy = lazy
        self.blocks: list[RamBlock] = []
        self.start_ns = 0
        self.running_ns = 0
        self.end_ns = 0
        self.pages_read = 0
        self._lazy: LazyRestore | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.start_ns = time.monotonic_ns()
        with open_snapshot(self.path, self.offset) as snapshot:
            snapshot.check_blocks(self.specs)
            self.blocks = create_blocks(self.specs)
            if self.lazy:
                lazy = self._lazy = LazyRestore(snapshot, self.blocks, self.guest)
                async with open_nursery() as nursery:
                    await nursery.start(lazy.run)
                    self.running_ns = lazy.running_ns
                    task_status.started()
                self.pages_read = lazy.filled_pages
            else:
                self.pages_read = await trio.to_thread.run_sync(load_eagerly, snapshot, self.blocks)
                await self.guest.attach(self.blocks, "incoming")
                await self.guest.load_state(snapshot.device_state)
                await self.guest.cont()
                self.running_ns = time.monotonic_ns()
                task_status.started()
        self.end_ns = time.monotonic_ns()

    def take_blocks(self) -> list[RamBlock]:
        blocks, self.blocks = self.blocks, []
        return blocks

    def close(self) -> None:
        """Free the blocks (if not taken) and the lazy restore's uffd."""
        if self._lazy is not None:
            self._lazy.close()
        for block in self.take_blocks():
            block.close()

    async def report(self) -> dict[str, Any]:
        """The restore's figures, JSON-ready: mode, times in ms (first step from the
        guest's own report), pages read, and the fault statistics of a lazy restore."""
        info: dict[str, Any] = {
            "status": "completed" if self.end_ns else "active",
            "mode": "lazy" if self.lazy else "eager",
            "file": self.path,
            "x-time-to-run-ms": _ms(self.running_ns - self.start_ns),
        }
        if self.end_ns:
            info["total-time"] = _ms(self.end_ns - self.start_ns)
        first = None
        with trio.move_on_after(FIRST_STEP_TIMEOUT):
            # The guest may answer a query before its first step after cont has run.
            while (first := (await self.guest.query()).get("x-first-step")) is None:
                await trio.sleep(0.01)
        if first:
            info["x-time-to-first-step-ms"] = _ms(first["start-ns"] - self.start_ns)
            info["x-first-step-done-ms"] = _ms(first["end-ns"] - self.start_ns)
        if self._lazy is not None:
            info.update(self._lazy.statistics())
            info["x-pages-filled"] = self._lazy.filled_pages
        else:
            info["x-pages-read"] = self.pages_read
        return info


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)
