"""Guest programs for the postcopy end-to-end tests.

``python postcopy_guests.py KIND [workload options]``; kinds:

  device-reads-ram   the built-in workload, but loading its device state reads RAM (the
                     counter of every 64th page), as a device reading its rings would:
                     on a postcopy destination that load faults before the guest runs,
                     which is why QEMU packages the device state.
  load-reads-all     the built-in workload, but loading its device state reads every page
                     (a guest that checks its whole memory at load-state, as the guest
                     protocol allows): on a postcopy destination the load waits for all
                     of RAM.
  reads-at-random    the built-in workload, and each step also reads pages at random over
                     all of RAM: on a postcopy destination it faults all along, up to the
                     last pages still in flight when the source has sent everything.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from trimig.guest import Guest
from trimig.guest.workload import Workload, parse_arguments
from trimig.units import parse_rate


class DeviceReadsRam(Workload):
    """The workload whose ``load_state`` touches RAM (and checks it is not a hole)."""

    def load_state(self, state: bytes) -> None:
        super().load_state(state)
        touched = [np.asarray(counters[::64]).copy() for counters in self._counters]
        # A page that arrived holds the pass count or one more; a hole would read 0 at
        # pass > 0 (the source ran long enough for a few passes).
        assert self.state is not None
        low = min(int(values.min()) for values in touched)
        if self.state.passes > 0 and low == 0:
            raise RuntimeError("device load read a page that never arrived (a zero hole)")


class LoadReadsAll(Workload):
    """The workload whose ``load_state`` reads every page (and checks none is a hole)."""

    def load_state(self, state: bytes) -> None:
        super().load_state(state)
        assert self.state is not None
        for counters in self._counters:
            low = int(np.asarray(counters).min())  # one read of every page
            if self.state.passes > 0 and low == 0:
                raise RuntimeError("device load read a page that never arrived (a zero hole)")


class ReadsAtRandom(Workload):
    """The workload that also reads RANDOM_READS pages at random in each step."""

    RANDOM_READS = 16

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._random = np.random.default_rng(0)

    def step(self) -> float | None:
        pause = super().step()
        if self.state is not None:
            for counters in self._counters:
                int(counters[self._random.integers(0, len(counters), self.RANDOM_READS)].sum())
        return pause


KINDS: dict[str, type[Workload]] = {
    "device-reads-ram": DeviceReadsRam,
    "load-reads-all": LoadReadsAll,
    "reads-at-random": ReadsAtRandom,
}


def main() -> int:
    kind, *options = sys.argv[1:]
    if kind not in KINDS:
        raise SystemExit(f"unknown guest kind {kind!r}")
    arguments = parse_arguments(options)
    program = KINDS[kind](
        dirty_rate=parse_rate(arguments.dirty_rate, what="dirty rate"),
        fill=arguments.fill,
        seed=arguments.seed,
    )
    guest = Guest.connect()
    try:
        return guest.run(program)
    finally:
        guest.close()


if __name__ == "__main__":
    raise SystemExit(main())
