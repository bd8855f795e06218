"""The precopy convergence decision (trimig.savevm.convergence.decide), a pure function."""

from __future__ import annotations

from trimig.savevm.convergence import Action, Decision, PostcopySettings, Reason, decide

MiB = 1 << 20


def after_pass(
    remaining: int,
    *,
    non_converging: int = 0,
    passes: int = 1,
    enabled: bool = False,
    requested: bool = False,
    after_passes: int = 0,
    auto_passes: int = 0,
) -> Decision:
    return decide(
        remaining=remaining,
        bandwidth=100 * MiB,  # 300 ms of downtime: 30 MiB may remain
        downtime_limit_ms=300,
        passes=passes,
        non_converging_passes=non_converging,
        postcopy=PostcopySettings(enabled, requested, after_passes, auto_passes),
    )


def test_completes_once_the_rest_fits_in_the_downtime_limit() -> None:
    decision = after_pass(30 * MiB)
    assert (decision.action, decision.reason) == (Action.COMPLETE, Reason.CONVERGED)
    assert decision.threshold == 30 * MiB
    assert decision.expected_downtime_ms == 300
    assert decision.converging is True
    assert decision.non_converging_passes == 0


def test_another_pass_while_not_converging() -> None:
    decision = after_pass(31 * MiB, non_converging=2)
    assert (decision.action, decision.reason) == (Action.CONTINUE, Reason.NOT_CONVERGING)
    assert decision.converging is False
    assert decision.non_converging_passes == 3


def test_requested_postcopy_switches_even_if_precopy_could_finish() -> None:
    decision = after_pass(0, enabled=True, requested=True)
    assert (decision.action, decision.reason) == (Action.POSTCOPY, Reason.REQUESTED)
    assert decision.converging is None  # not judged
    assert decision.non_converging_passes == 0


def test_postcopy_after_passes() -> None:
    assert after_pass(0, passes=2, enabled=True, after_passes=3).action is Action.COMPLETE
    decision = after_pass(0, passes=3, enabled=True, after_passes=3)
    assert (decision.action, decision.reason) == (Action.POSTCOPY, Reason.AFTER_PASSES)
    # Without the postcopy-ram capability the setting does nothing.
    assert after_pass(0, passes=3, after_passes=3).action is Action.COMPLETE


def test_postcopy_after_too_many_passes_that_do_not_converge() -> None:
    busy = 64 * MiB
    assert after_pass(busy, non_converging=1, enabled=True, auto_passes=3).action is Action.CONTINUE
    decision = after_pass(busy, non_converging=2, enabled=True, auto_passes=3)
    assert (decision.action, decision.reason) == (
        Action.POSTCOPY,
        Reason.NOT_CONVERGING_AUTO_POSTCOPY,
    )
    assert decision.converging is False
    assert decision.non_converging_passes == 3
    assert after_pass(busy, non_converging=2, auto_passes=3).action is Action.CONTINUE
    # A pass that converges completes whatever the count.
    assert after_pass(0, non_converging=5, enabled=True, auto_passes=3).action is Action.COMPLETE


def test_no_bandwidth_measured_yet() -> None:
    decision = decide(
        remaining=MiB,
        bandwidth=0,
        downtime_limit_ms=300,
        passes=1,
        non_converging_passes=0,
        postcopy=PostcopySettings(),
    )
    assert decision.action is Action.CONTINUE
    assert decision.expected_downtime_ms == MiB * 1000


def test_the_throttle_follows_qemus_steps() -> None:
    from trimig.savevm.convergence import ThrottleSettings, next_throttle

    settings = ThrottleSettings(initial=20, increment=10, maximum=35)
    step = next_throttle(percentage=0, high_passes=0, dirtied=60, sent=100, settings=settings)
    assert (step.percentage, step.high_passes) == (0, 1)  # once is not enough
    step = next_throttle(percentage=0, high_passes=1, dirtied=60, sent=100, settings=settings)
    assert (step.percentage, step.high_passes) == (20, 0)
    step = next_throttle(percentage=20, high_passes=1, dirtied=60, sent=100, settings=settings)
    assert step.percentage == 30
    step = next_throttle(percentage=30, high_passes=1, dirtied=60, sent=100, settings=settings)
    assert step.percentage == 35  # capped
    calm = next_throttle(percentage=30, high_passes=1, dirtied=40, sent=100, settings=settings)
    assert (calm.percentage, calm.high_passes) == (30, 1)  # under the threshold: unchanged
    tail = ThrottleSettings(initial=20, increment=10, tailslow=True)
    step = next_throttle(percentage=50, high_passes=1, dirtied=55, sent=100, settings=tail)
    assert 50 < step.percentage < 60  # only what the ratio calls for
