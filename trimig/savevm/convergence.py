"""The convergence decision after each precopy pass: a pure function of the figures.

After a whole pass the source syncs the dirty log and asks ``decide``: go on with
another pass, stop the guest and complete (what is left fits in the downtime limit at
the measured or announced bandwidth), or switch to postcopy (asked for, after a fixed
number of passes, or after too many passes that did not converge).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    CONTINUE = "continue"
    COMPLETE = "complete"
    POSTCOPY = "postcopy"


class Reason(enum.Enum):
    #: migrate-start-postcopy was asked for: switch now, even if precopy could finish.
    REQUESTED = "postcopy requested"
    #: x-postcopy-after-passes passes are done.
    AFTER_PASSES = "postcopy after passes"
    #: What is left fits in the downtime limit.
    CONVERGED = "converged"
    #: Too many passes did not converge (x-postcopy-auto-passes).
    NOT_CONVERGING_AUTO_POSTCOPY = "not converging: auto postcopy"
    #: Not yet: another pass.
    NOT_CONVERGING = "not converging"


@dataclass(frozen=True)
class PostcopySettings:
    #: The postcopy-ram capability.
    enabled: bool = False
    #: migrate-start-postcopy was asked for.
    requested: bool = False
    #: x-postcopy-after-passes (0: off).
    after_passes: int = 0
    #: x-postcopy-auto-passes (0: off).
    auto_passes: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    #: Bytes that may remain to complete within the downtime limit.
    threshold: float
    expected_downtime_ms: int
    #: Whether this pass converged; None when not judged (postcopy asked for first).
    converging: bool | None
    #: Passes that did not converge, this one included.
    non_converging_passes: int


def decide(
    *,
    remaining: int,
    bandwidth: float,
    downtime_limit_ms: int,
    passes: int,
    non_converging_passes: int,
    postcopy: PostcopySettings,
) -> Decision:
    """Decide after pass ``passes`` (dirty syncs so far), with ``remaining`` dirty bytes
    and ``bandwidth`` in bytes per second (the announced switchover bandwidth, else the
    measured one); ``non_converging_passes`` counts the earlier passes that did not
    converge."""
    threshold = bandwidth * downtime_limit_ms / 1000
    expected_downtime_ms = int(remaining / max(bandwidth, 1) * 1000)

    def decision(action: Action, reason: Reason, converging: bool | None, count: int) -> Decision:
        return Decision(action, reason, threshold, expected_downtime_ms, converging, count)

    if postcopy.requested:
        return decision(Action.POSTCOPY, Reason.REQUESTED, None, non_converging_passes)
    if postcopy.enabled and postcopy.after_passes and passes >= postcopy.after_passes:
        return decision(Action.POSTCOPY, Reason.AFTER_PASSES, None, non_converging_passes)
    if remaining <= threshold:
        return decision(Action.COMPLETE, Reason.CONVERGED, True, non_converging_passes)
    count = non_converging_passes + 1
    if postcopy.enabled and postcopy.auto_passes and count >= postcopy.auto_passes:
        return decision(Action.POSTCOPY, Reason.NOT_CONVERGING_AUTO_POSTCOPY, False, count)
    return decision(Action.CONTINUE, Reason.NOT_CONVERGING, False, count)
