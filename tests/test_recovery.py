"""Postcopy recovery end to end: two ``trimig run`` engines driven over QMP by the
unmodified ``qemu.qmp`` client, a cutting proxy between them (tests/cutting_proxy.py), the
adversarial guest checking every page at the end (tests/recovery_harness.py).

Each run cuts the link after the switch (the proxy goes silent, or resets, or
``migrate-pause`` on one side), checks that both sides report ``postcopy-paused`` within
the bound of x-channel-timeout, recovers with QEMU's sequence (``migrate-recover`` on the
destination, ``migrate`` with ``resume: true`` on the source), and does it again; one
recovery attempt goes to an address where nothing listens first and must leave the
migration paused and retryable. The 100-run campaign with random cut points is
``python tests/recovery_campaign.py`` (docs/correctness.md).
"""

from __future__ import annotations

import pytest
from recovery_harness import PAUSE_BOUND, RecoveryPlan, migrate_with_cuts

PLANS = {
    # Main channel only, tcp: a black hole (detected by x-channel-timeout on both sides),
    # then a failed attempt, then a reset.
    "tcp-main-hole-reset": RecoveryPlan(
        seed=11,
        preempt=False,
        transport="tcp",
        cuts=((0.3, "hole"), (0.2, "reset")),
        failed_attempt=True,
    ),
    # Preempt, unix: migrate-pause on each side, then a black hole.
    "unix-preempt-pauses-hole": RecoveryPlan(
        seed=12,
        preempt=True,
        transport="unix",
        huge="4M",
        cuts=((0.2, "pause-source"), (0.2, "pause-destination"), (0.2, "hole")),
    ),
    # x-postcopy-auto-recover: no recovery command at all; the network goes silent for a
    # while, then resets, and the engines re-establish the channels themselves.
    "tcp-preempt-auto": RecoveryPlan(
        seed=13, preempt=True, transport="tcp", cuts=((0.3, "hole"), (0.2, "reset")), auto=True
    ),
    # The CLI: trimig pause, trimig recover on the destination, trimig migrate --qmp --resume on the
    # source, trimig info verify at the end.
    "tcp-cli": RecoveryPlan(
        seed=14, preempt=False, transport="tcp", cuts=((0.3, "pause-destination"),), via_cli=True
    ),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_postcopy_survives_cuts_through_qmp(name: str, request: pytest.FixtureRequest) -> None:
    plan = PLANS[name]
    if plan.huge != "0":
        request.getfixturevalue("hugepages")  # both engines' 4 MiB hugetlb blocks
    result = migrate_with_cuts(plan)
    assert result.ok, result.describe()
    # Every cut landed in postcopy and was recovered from (the runs are slow enough).
    assert result.recoveries == len(plan.cuts), result.describe()
    assert len(result.pauses) == len(plan.cuts)
    assert all(pause < PAUSE_BOUND for pause in result.pauses), result.pauses
    assert result.failed_attempts == int(plan.failed_attempt)
    assert result.verify["detail"].startswith("all "), result.verify
