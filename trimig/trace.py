"""Trace events: one structured record at each migration phase, on the ``trimig.trace`` logger.

They are DEBUG records, so they cost one level check when tracing is off; turn them on
with ``trimig -vv`` or ``logging.getLogger("trimig.trace").setLevel(logging.DEBUG)``.
"""

from __future__ import annotations

import logging

_log = logging.getLogger("trimig.trace")


def trace(event: str, **fields: object) -> None:
    """Record ``event`` (e.g. ``postcopy_listen``) with its fields as ``key=value`` pairs."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s %s", event, " ".join(f"{key}={value}" for key, value in fields.items()))
