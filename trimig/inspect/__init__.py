"""``trimig inspect``: read a migration stream saved to a file, QEMU's or trimig's.

:func:`~trimig.inspect.walker.inspect_file` walks the file and returns a
:class:`~trimig.inspect.report.StreamReport` (header, configuration, sections, commands,
RAM blocks with page counts, the VM description), optionally writing each RAM block to a
file. ``docs/inspect.md`` describes it. The submodules are imported on first use, so that
registering the command costs the command line nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trimig.inspect.report import StreamReport
    from trimig.inspect.walker import BadStreamFile, inspect_file

__all__ = ["BadStreamFile", "StreamReport", "inspect_file"]


def __getattr__(name: str) -> Any:
    if name in ("BadStreamFile", "inspect_file"):
        from trimig.inspect import walker

        return getattr(walker, name)
    if name == "StreamReport":
        from trimig.inspect import report

        return report.StreamReport
    raise AttributeError(f"module 'trimig.inspect' has no attribute {name!r}")
