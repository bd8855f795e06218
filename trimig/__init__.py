"""trimig: live migration of running guests (precopy and postcopy), built on trio.

The main entry points, importable from here:

* ``OutgoingMigration(guest, blocks, ...).run(uri)``: move a running guest away;
* ``IncomingMigration(specs, ...).listen_and_run(uri)``: receive one and start it;
* ``open_engine(...)``: a long-running engine (what ``trimig run`` serves over QMP);
* ``GuestProcess``, ``RamBlockSpec``, ``create_blocks``: the guest and its RAM;
* ``MigrationStatus``, ``MigrationCapabilities``, ``MigrationParameters``.

They are imported lazily, so a guest process that only needs ``trimig.guest``
does not pay for the engine's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OutgoingMigration": "trimig.savevm.outgoing",
    "IncomingMigration": "trimig.loadvm.incoming",
    "Engine": "trimig.engine",
    "open_engine": "trimig.engine",
    "GuestProcess": "trimig.guest.host",
    "Verdict": "trimig.guest.host",
    "workload_command": "trimig.guest.host",
    "RamBlockSpec": "trimig.ram_blocks",
    "RamBlock": "trimig.ram_blocks",
    "create_blocks": "trimig.ram_blocks",
    "default_block_specs": "trimig.ram_blocks",
    "MigrationStatus": "trimig.migration",
    "MigrationCapabilities": "trimig.migration",
    "MigrationParameters": "trimig.migration",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trimig' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
