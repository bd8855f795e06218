"""The migration state machine tables (trimig/status.py)."""

from __future__ import annotations

import pytest

from trimig.errors import LocalProtocolError
from trimig.migration import MigrationStatus as S
from trimig.status import DESTINATION, FINAL, SOURCE, StatusMachine, Table


def _reachable(table: Table) -> set[S]:
    seen, todo = {S.NONE}, [S.NONE]
    while todo:
        for new in table[todo.pop()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


@pytest.mark.parametrize("table", [SOURCE, DESTINATION], ids=["source", "destination"])
def test_every_state_is_reachable_and_final_states_stay(table: Table) -> None:
    assert _reachable(table) == set(table)
    for state in FINAL:
        assert table[state] == frozenset()
    # Once the guest runs on the destination, no move resumes it here (failed/cancelled).
    assert not table[S.POSTCOPY_ACTIVE] & {S.FAILED, S.CANCELLED}


def test_moves_follow_the_table_and_report_each_change() -> None:
    seen: list[tuple[S, S]] = []
    machine = StatusMachine(SOURCE, "source", lambda old, new: seen.append((old, new)))
    for state in (S.SETUP, S.ACTIVE, S.ACTIVE, S.DEVICE, S.COMPLETED):
        machine.move(state)
    assert machine.current is S.COMPLETED
    assert seen == [
        (S.NONE, S.SETUP),
        (S.SETUP, S.ACTIVE),
        (S.ACTIVE, S.DEVICE),
        (S.DEVICE, S.COMPLETED),
    ]


def test_an_illegal_move_is_refused_loudly() -> None:
    machine = StatusMachine(DESTINATION, "destination")
    machine.move(S.SETUP)
    with pytest.raises(LocalProtocolError, match="cannot go from 'setup' to 'postcopy-active'"):
        machine.move(S.POSTCOPY_ACTIVE)
    assert machine.current is S.SETUP
    assert not machine.can_move(S.COMPLETED)


#: QEMU's recovery moves (qemu-migration-protocol.md §5.2, §5.3, §7.2).
RECOVERY_MOVES = {
    "source": [
        (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP),
        (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE),
    ],
    "destination": [
        (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE),
    ],
}


@pytest.mark.parametrize("side", ["source", "destination"])
def test_recovery_moves_are_qemus_and_never_fail_the_guest(side: str) -> None:
    table = SOURCE if side == "source" else DESTINATION
    recovery = {S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER}
    moves = {(old, new) for old in recovery & set(table) for new in table[old]}
    moves |= {(S.POSTCOPY_ACTIVE, new) for new in table[S.POSTCOPY_ACTIVE] if new in recovery}
    assert moves == set(RECOVERY_MOVES[side])
    # The destination has no recover-setup; neither side fails or cancels from a pause.
    assert (S.POSTCOPY_RECOVER_SETUP in table) == (side == "source")
    for state in recovery & set(table):
        assert not table[state] & {S.FAILED, S.CANCELLED, S.COMPLETED}
    # Any number of pauses and recoveries in one migration.
    machine = StatusMachine(table, side)
    path = [S.SETUP, S.ACTIVE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE]
    if side == "source":
        path.insert(2, S.DEVICE)
    for _ in range(3):  # a pause, a recovery attempt that fails, one that succeeds
        if side == "source":
            path += [S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED]
            path += [S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED]
            path += [S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE]
        else:
            path += [S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED]
            path += [S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE]
    for state in [*path, S.COMPLETED]:
        machine.move(state)
    assert machine.current is S.COMPLETED
