"""A guest that refuses every device state it is asked to load (for the tests of a
destination that rejects a stream): ``python refusing_guest.py [workload options]``.

It is the built-in workload in every other respect, so it attaches, runs as a source and
answers the engine; only ``load-state`` fails, with REFUSAL in its error.
"""

from __future__ import annotations

import sys

from trimig.guest import Guest, GuestRequestError
from trimig.guest.workload import Workload, parse_arguments
from trimig.units import parse_rate

#: The text of the guest's load-state error.
REFUSAL = "this guest refuses every device state"


class RefusingWorkload(Workload):
    def load_state(self, state: bytes) -> None:
        raise GuestRequestError(f"{REFUSAL} ({len(state)} bytes offered)")


def main() -> int:
    arguments = parse_arguments(sys.argv[1:])
    program = RefusingWorkload(
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
