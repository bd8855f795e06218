"""The destination's postcopy sub-state (QEMU's PostcopyState; not visible in QMP).

NONE -> ADVISE -> DISCARD -> LISTENING -> RUNNING -> END. Each command handler
calls the matching ``on_*`` method first; a command out of order raises
RemoteProtocolError naming the command and the current state.
"""

from __future__ import annotations

import enum

from ..errors import RemoteProtocolError


class PostcopyState(enum.IntEnum):
    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5


class PostcopyStateMachine:
    """Tracks the sub-state; every transition returns the state it left."""

    def __init__(self) -> None:
        self._state = PostcopyState.NONE

    @property
    def state(self) -> PostcopyState:
        return self._state

    @property
    def placing_atomically(self) -> bool:
        """True from LISTENING until END: RAM must be placed with userfaultfd ioctls."""
        return self._state in (PostcopyState.LISTENING, PostcopyState.RUNNING)

    def on_advise(self) -> PostcopyState:
        """POSTCOPY_ADVISE: NONE -> ADVISE."""
        return self._move("POSTCOPY_ADVISE", (PostcopyState.NONE,), PostcopyState.ADVISE)

    def on_discard(self) -> PostcopyState:
        """POSTCOPY_RAM_DISCARD: ADVISE/DISCARD -> DISCARD. The first discard returns
        ADVISE (the caller turns transparent huge pages off then)."""
        return self._move(
            "POSTCOPY_RAM_DISCARD",
            (PostcopyState.ADVISE, PostcopyState.DISCARD),
            PostcopyState.DISCARD,
        )

    def on_listen(self) -> PostcopyState:
        """POSTCOPY_LISTEN: ADVISE/DISCARD -> LISTENING. Returns ADVISE if no discard came."""
        return self._move(
            "POSTCOPY_LISTEN",
            (PostcopyState.ADVISE, PostcopyState.DISCARD),
            PostcopyState.LISTENING,
        )

    def on_run(self) -> PostcopyState:
        """POSTCOPY_RUN: LISTENING -> RUNNING."""
        return self._move("POSTCOPY_RUN", (PostcopyState.LISTENING,), PostcopyState.RUNNING)

    def on_end(self) -> PostcopyState:
        """The listening phase ended (the stream reached its end): LISTENING/RUNNING -> END."""
        return self._move(
            "end of the postcopy stream",
            (PostcopyState.LISTENING, PostcopyState.RUNNING),
            PostcopyState.END,
        )

    def _move(
        self, command: str, allowed: tuple[PostcopyState, ...], target: PostcopyState
    ) -> PostcopyState:
        previous = self._state
        if previous not in allowed:
            expected = " or ".join(state.name for state in allowed)
            raise RemoteProtocolError(
                f"{command} received in postcopy state {previous.name} (expected {expected})"
            )
        self._state = target
        return previous

    def __repr__(self) -> str:
        return f"PostcopyStateMachine({self._state.name})"
