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


@dataclass(frozen=True)
class ThrottleSettings:
    """auto-converge's parameters (QEMU's names, in percent)."""

    trigger_threshold: int = 50
    initial: int = 20
    increment: int = 10
    tailslow: bool = False
    maximum: int = 99


@dataclass(frozen=True)
class ThrottleStep:
    #: The guest's CPU throttle after this pass, in percent (0: not throttled).
    percentage: int
    #: Passes in a row that dirtied more than the threshold, since the last change.
    high_passes: int


def next_throttle(
    *, percentage: int, high_passes: int, dirtied: int, sent: int, settings: ThrottleSettings
) -> ThrottleStep:
    """QEMU's migration_trigger_throttle and mig_throttle_guest_down after one pass: when
    the bytes dirtied in the pass exceed ``trigger_threshold`` % of the bytes sent, twice,
    start at ``initial`` or add ``increment`` (with ``tailslow``, only what the ratio
    calls for), capped at ``maximum``."""
    threshold = sent * settings.trigger_threshold / 100
    if dirtied <= threshold:
        return ThrottleStep(percentage, high_passes)
    high_passes += 1
    if high_passes < 2:
        return ThrottleStep(percentage, high_passes)
    if percentage == 0:
        return ThrottleStep(settings.initial, 0)
    increment = settings.increment
    if settings.tailslow:
        cpu_now = 100 - percentage
        cpu_ideal = cpu_now * (threshold / dirtied)
        increment = max(1, min(int(cpu_now - cpu_ideal), settings.increment))
    return ThrottleStep(min(percentage + increment, settings.maximum), 0)


def not_converging_reason(
    *,
    dirty_rate: float,
    bandwidth: float,
    remaining: int,
    threshold: float,
    expected_downtime_ms: int,
    downtime_limit_ms: int,
    aids: str,
) -> str:
    """query-migrate's ``x-not-converging``: why precopy does not end, in one line.
    ``aids`` names what is already helping ("auto-converge throttling 40%", "") ."""
    mib = 1 << 20
    reason = (
        f"the guest dirties {dirty_rate / mib:.1f} MiB/s and {bandwidth / mib:.1f} MiB/s is "
        f"sent: {remaining / mib:.1f} MiB remain, {threshold / mib:.1f} MiB fit in the "
        f"{downtime_limit_ms} ms downtime limit (expected downtime {expected_downtime_ms} ms)"
    )
    if aids:
        return f"{reason}; {aids}"
    return f"{reason}; auto-converge, dirty-limit, postcopy or a larger downtime-limit would end it"
