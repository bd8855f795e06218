"""The interface the QMP layer needs from the engine (implemented by ``trimig.engine.Engine``).

Names and shapes follow QEMU's QMP (qemu-migration-protocol.md §8, §10). Errors: methods raise
:class:`trimig.errors.ConfigError` for bad input or a wrong state and other
:class:`trimig.errors.TrimigError` subclasses for failures; the QMP layer turns every
``TrimigError`` into a ``GenericError`` whose ``desc`` is the exception text.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

#: What :meth:`EngineControl.subscribe_events` delivers: ``(event name, event data, time)``,
#: the time (seconds since the epoch) when the event happened, which is its QMP timestamp.
EngineEvent = tuple[str, dict[str, Any], float]


class EngineControl(Protocol):
    """Everything the QMP commands call. Sync methods must not block."""

    def set_capabilities(self, capabilities: dict[str, bool]) -> None:
        """Set migration capabilities by QEMU name. ConfigError on an unknown name, a conflict
        or while a migration runs; on error nothing is changed."""

    def query_capabilities(self) -> list[dict[str, Any]]:
        """``[{"capability": name, "state": bool}, ...]`` for every capability."""

    def set_parameters(self, parameters: dict[str, Any]) -> None:
        """Set migration parameters by QEMU name; ConfigError on an unknown name or bad value."""

    def query_parameters(self) -> dict[str, Any]:
        """Every parameter and its current value."""

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        """Start an outgoing migration to ``uri`` in the engine's nursery; return at once.
        With ``resume``: recover a paused postcopy over a new connection to ``uri``."""

    def migrate_pause(self) -> None:
        """``migrate-pause``: break a running postcopy's channels on purpose (either side);
        ConfigError unless postcopy-active or postcopy-recover."""

    async def migrate_recover(self, uri: str) -> None:
        """``migrate-recover`` (destination): listen on ``uri`` for the source's recovery;
        return once listening. ConfigError unless postcopy-paused."""

    async def migrate_incoming(self, uri: str) -> None:
        """Start listening on ``uri`` for an incoming migration; return once listening."""

    def start_postcopy(self) -> None:
        """Ask a running precopy migration to switch to postcopy."""

    def cancel(self) -> None:
        """``migrate_cancel``: no-op when nothing runs; ConfigError once postcopy has started."""

    def query_migrate(self) -> dict[str, Any]:
        """``MigrationInfo``: ``status``, ``ram`` {...}, ``total-time``, ... (§8.3)."""

    def query_status(self) -> dict[str, Any]:
        """``{"running": bool, "status": "running" | "paused" | "inmigrate" | ...}``."""

    async def stop(self) -> None:
        """Pause the guest (emits STOP)."""

    async def cont(self) -> None:
        """Resume the guest (emits RESUME)."""

    async def verify_guest(self) -> dict[str, Any]:
        """``x-guest-verify``: the guest checks its memory (paused around the check if it
        runs); ``{"verified": bool, "detail": str}``. ConfigError without a guest here."""

    def dump_bitmaps(self) -> dict[str, Any]:
        """``x-dump-bitmaps``: ``{"text": str}``, the page bitmaps of this engine's migration
        as text (QEMU's ram_debug_dump_bitmap: a source's dirty and sent bitmaps, a
        destination's received bitmap, per block). ConfigError without a migration."""

    def object_add(self, arguments: dict[str, Any]) -> None:
        """``object-add``: make a ``tls-creds-x509``, ``authz-list`` or ``authz-simple``
        object (``qom-type``, ``id`` and its properties); ConfigError naming what is wrong."""

    def object_del(self, object_id: str) -> None:
        """``object-del``: remove the object ``object_id``; ConfigError if there is none."""

    async def quit(self) -> None:
        """Shut the engine down. The QMP reply has already been sent when this is called."""

    def subscribe_events(
        self,
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[EngineEvent]]:
        """A fresh subscription to engine events, ended when the context exits.

        Events: ``("MIGRATION", {"status": s}, t)`` and ``("MIGRATION_PASS", {"pass": n}, t)``
        (only while capability ``events`` is on), ``("STOP", {}, t)``, ``("RESUME", {}, t)``;
        ``t`` is when it happened (a busy loop may deliver it later). The engine
        should buffer per subscriber and never block on one; the QMP server drains promptly.
        """
