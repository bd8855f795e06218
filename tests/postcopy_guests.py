"""Guest programs for the postcopy end-to-end tests.

``python postcopy_guests.py KIND [workload options]``; kinds:

  device-reads-ram   the built-in workload, but loading its device state reads RAM (the
                     counter of every 64th page), as a device reading its rings would:
                     on a postcopy destination that load faults before the guest runs,
                     which is why QEMU packages the device state.
"""

from __future__ import annotations

import sys

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


def main() -> int:
    kind, *options = sys.argv[1:]
    if kind != "device-reads-ram":
        raise SystemExit(f"unknown guest kind {kind!r}")
    arguments = parse_arguments(options)
    program = DeviceReadsRam(
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
