"""The destination's postcopy sub-state."""

from __future__ import annotations

import pytest

from trimig.errors import RemoteProtocolError
from trimig.postcopy.state import PostcopyState, PostcopyStateMachine


def test_full_sequence_with_discards() -> None:
    machine = PostcopyStateMachine()
    assert machine.on_advise() is PostcopyState.NONE
    assert machine.on_discard() is PostcopyState.ADVISE  # first discard
    assert machine.on_discard() is PostcopyState.DISCARD
    assert not machine.placing_atomically
    assert machine.on_listen() is PostcopyState.DISCARD
    assert machine.placing_atomically
    assert machine.on_run() is PostcopyState.LISTENING
    assert machine.state is PostcopyState.RUNNING
    assert machine.on_end() is PostcopyState.RUNNING
    assert machine.state is PostcopyState.END
    assert not machine.placing_atomically


def test_listen_without_discard() -> None:
    machine = PostcopyStateMachine()
    machine.on_advise()
    assert machine.on_listen() is PostcopyState.ADVISE  # caller disables THP then


@pytest.mark.parametrize(
    ("steps", "command", "message"),
    [
        (
            [],
            "on_discard",
            "POSTCOPY_RAM_DISCARD received in postcopy state NONE "
            r"\(expected ADVISE or DISCARD\)",
        ),
        ([], "on_listen", "POSTCOPY_LISTEN received in postcopy state NONE"),
        (
            ["on_advise"],
            "on_advise",
            "POSTCOPY_ADVISE received in postcopy state ADVISE "
            r"\(expected NONE\)",
        ),
        (
            ["on_advise"],
            "on_run",
            "POSTCOPY_RUN received in postcopy state ADVISE "
            r"\(expected LISTENING\)",
        ),
        (
            ["on_advise", "on_listen"],
            "on_discard",
            "POSTCOPY_RAM_DISCARD received in postcopy state LISTENING",
        ),
        (
            ["on_advise", "on_listen"],
            "on_listen",
            "POSTCOPY_LISTEN received in postcopy state LISTENING",
        ),
        (
            ["on_advise", "on_listen", "on_run"],
            "on_run",
            "POSTCOPY_RUN received in postcopy state RUNNING",
        ),
        (["on_advise"], "on_end", "end of the postcopy stream received in postcopy state ADVISE"),
    ],
)
def test_out_of_order_commands_are_refused(steps: list[str], command: str, message: str) -> None:
    machine = PostcopyStateMachine()
    for step in steps:
        getattr(machine, step)()
    before = machine.state
    with pytest.raises(RemoteProtocolError, match=message):
        getattr(machine, command)()
    assert machine.state is before
