"""Nurseries that raise one error as itself, on every trio version.

Since trio 0.25 a nursery wraps whatever its tasks raise in an ExceptionGroup, even a single
error; before, it raised a single error as itself. trimig's contracts name exception types
(MigrationFailed, TransportError, Cancelled, ...), so its nurseries come from
:func:`open_nursery`, which raises the one real error of a group as itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import trio

__all__ = ["open_nursery", "sole_error"]


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """``trio.open_nursery()``, but a group it raises comes out as :func:`sole_error` says:
    its one real error as itself (traceback, cause and context kept), one Cancelled if that
    is all it holds (for the cancel scope that caused it), else the group unchanged."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        error = sole_error(group)
        if error is group:
            raise
        context = error.__context__
        try:
            raise error  # sets error.__context__ to the group: restored below
        finally:
            error.__context__ = context
            del error, context


def sole_error(exc: BaseException) -> BaseException:
    """What ``exc`` comes down to: itself unless it is a group; for a group (nested groups
    flattened), its only exception that is not trio.Cancelled, or its first Cancelled when
    it holds nothing else, or else (several real errors) the group itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return leaves[0]
    return exc


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
