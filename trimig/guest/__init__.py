"""The guest side of trimig: the library a guest program uses to be migrated.

``trimig.guest.library`` is the library (:class:`Guest`, :class:`GuestProgram`; its
docstring shows a program), ``protocol`` the messages it exchanges with the engine,
``workload`` the built-in guest, and ``host`` the engine's end (``GuestProcess``). The
library's names are importable from here::

    from trimig.guest import Guest, GuestProgram
"""

from .library import (
    Event,
    Guest,
    GuestBlock,
    GuestProgram,
    GuestRequestError,
    Role,
    VerifyResult,
    register_blocks,
    uffd_features,
)

__all__ = [
    "Event",
    "Guest",
    "GuestBlock",
    "GuestProgram",
    "GuestRequestError",
    "Role",
    "VerifyResult",
    "register_blocks",
    "uffd_features",
]
