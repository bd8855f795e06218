"""The migration state machine: QEMU's MigrationStatus values and the moves allowed between
them, as one table per side (the way h11 keeps its connection states), used by both sides.

A side holds a :class:`StatusMachine`; ``move(new)`` changes the status if the table allows
it and raises :class:`~trimig.errors.LocalProtocolError` (our own bug, loudly) if not.
Moving to the current status is a no-op. The value is a ``trio_util.AsyncValue`` so callers
can wait for a status; a callback hears every move (the MIGRATION event).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from trio_util import AsyncValue

from .errors import ConfigError, LocalProtocolError
from .migration import MigrationStatus as S
from .trace import trace

log = logging.getLogger("trimig.status")

Table = Mapping[S, frozenset[S]]
#: ``on_event(name, data)``: a migration object's QMP events (MIGRATION, STOP, RESUME, ...).
EventCallback = Callable[[str, dict[str, Any]], None]

#: Where a finished migration stays.
FINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

#: The source's statuses once the destination runs the guest (its PONG 0x42 came): from
#: there a failure pauses the migration instead of resuming the guest on the source.
#: Postcopy recovery's states belong here too.
GUEST_ON_DESTINATION = frozenset(
    {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER}
)

#: Where migrate-pause may break a postcopy's channels (QEMU's migrate_pause): running,
#: or in the middle of a recovery.
PAUSABLE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})


def _table(moves: dict[S, set[S]]) -> Table:
    return MappingProxyType({state: frozenset(to) for state, to in moves.items()})


#: The source (QEMU's migration_state for an outgoing migration). Before the destination
#: runs the guest (PONG 0x42) a failure ends ``failed`` or ``cancelled`` with the guest
#: running here; after it, ``postcopy-paused``, and recovery, as QEMU's:
#: postcopy-recover-setup -> postcopy-recover -> postcopy-active, as many times as needed.
SOURCE: Table = _table(
    {
        S.NONE: {S.SETUP},
        S.SETUP: {S.ACTIVE, S.FAILED, S.CANCELLED},
        S.ACTIVE: {S.DEVICE, S.FAILED, S.CANCELLED},
        S.DEVICE: {S.COMPLETED, S.POSTCOPY_DEVICE, S.FAILED, S.CANCELLED},
        S.POSTCOPY_DEVICE: {S.POSTCOPY_ACTIVE, S.FAILED, S.CANCELLED},
        S.POSTCOPY_ACTIVE: {S.COMPLETED, S.POSTCOPY_PAUSED},
        # Recovery (migrate resume=true): connecting, then the handshake until RESUME_ACK;
        # a failure at either step goes back to paused, never to failed.
        S.POSTCOPY_PAUSED: {S.POSTCOPY_RECOVER_SETUP},
        S.POSTCOPY_RECOVER_SETUP: {S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED},
        S.POSTCOPY_RECOVER: {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED},
        S.COMPLETED: set(),
        S.FAILED: set(),
        S.CANCELLED: set(),
    }
)

#: The destination (QEMU's incoming state): active while loading, postcopy-* once LISTEN
#: came, postcopy-paused once the guest runs here and a channel broke, and recovery:
#: postcopy-paused -> postcopy-recover -> postcopy-active.
DESTINATION: Table = _table(
    {
        S.NONE: {S.SETUP},
        S.SETUP: {S.ACTIVE, S.FAILED, S.CANCELLED},
        S.ACTIVE: {S.COMPLETED, S.POSTCOPY_DEVICE, S.FAILED, S.CANCELLED},
        # The guest may already run here (RUN loaded) before postcopy-active is shown.
        S.POSTCOPY_DEVICE: {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED, S.CANCELLED},
        S.POSTCOPY_ACTIVE: {S.COMPLETED, S.POSTCOPY_PAUSED},
        # Recovery (migrate-recover): the source's new channel accepted, then the
        # handshake until POSTCOPY_RESUME; a failure goes back to paused. No recover-setup.
        S.POSTCOPY_PAUSED: {S.POSTCOPY_RECOVER},
        S.POSTCOPY_RECOVER: {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED},
        S.COMPLETED: set(),
        S.FAILED: set(),
        S.CANCELLED: set(),
    }
)


class StatusMachine:
    """The status of one migration on one side, moved only along ``table``."""

    def __init__(
        self,
        table: Table,
        side: str,
        on_change: Callable[[S, S], None] | None = None,
    ) -> None:
        self.table = table
        self.side = side
        self.value: AsyncValue[S] = AsyncValue(S.NONE)
        self._on_change = on_change

    @property
    def current(self) -> S:
        return self.value.value

    def can_move(self, new: S) -> bool:
        return new is self.current or new in self.table[self.current]

    def move(self, new: S) -> None:
        """Move to ``new``; LocalProtocolError if the table does not allow it."""
        old = self.current
        if new is old:
            return
        if new not in self.table[old]:
            raise LocalProtocolError(
                f"{self.side} migration cannot go from {old.value!r} to {new.value!r}"
            )
        log.info("%s status %s -> %s", self.side, old.value, new.value)
        trace(f"{self.side}_status", old=old.value, new=new.value)
        self.value.value = new
        if self._on_change is not None:
            self._on_change(old, new)


class StatusHolder:
    """What a migration object (OutgoingMigration, IncomingMigration) shares about its
    status: it sets ``_status`` (a StatusMachine whose callback is ``_status_changed``) and
    ``_on_event``; every move is a MIGRATION event."""

    _status: StatusMachine
    _on_event: EventCallback | None
    #: How messages name the migration of this side ("outgoing", "incoming").
    _direction: str

    @property
    def status(self) -> AsyncValue[S]:
        """The migration's status (wait on it with ``wait_value``)."""
        return self._status.value

    def _set_status(self, status: S) -> None:
        self._status.move(status)

    def _require_pausable(self) -> None:
        """migrate-pause's precondition on either side: ConfigError naming the status."""
        status = self.status.value
        if status not in PAUSABLE:
            raise ConfigError(
                "migrate-pause needs postcopy-active or postcopy-recover; the "
                f"{self._direction} migration is {status.value}"
            )

    def _status_changed(self, old: S, new: S) -> None:
        if self._on_event:
            self._on_event("MIGRATION", {"status": new.value})
