"""Human output: a progress line on stderr while migrating, and the final statistics table."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import trio

from ._trio import open_nursery
from .units import format_size

BAR_WIDTH = 28


def progress_line(info: dict[str, Any]) -> str:
    """One line of progress from a query-migrate result."""
    ram = info.get("ram", {})
    total = ram.get("total") or 1
    remaining = ram.get("remaining", total)
    status = info.get("status", "?")
    done = 1.0 if status == "completed" else max(0.0, min(1.0, 1 - remaining / total))
    filled = int(done * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return (
        f"[{bar}] {status:<16} pass {ram.get('dirty-sync-count', 0):>3}  "
        f"sent {format_size(ram.get('transferred', 0)):>10}  "
        f"{ram.get('mbps', 0) / 8:>8.1f} MB/s  remaining {format_size(remaining):>10}"
    )


async def show_progress(
    query: Callable[[], dict[str, Any]], *, stream: TextIO = sys.stderr, interval: float = 0.2
) -> None:
    """Redraw the progress line until cancelled; on a non-terminal, print one line a second."""
    is_tty = stream.isatty()
    every = 1 if is_tty else max(1, int(1.0 / interval))
    tick = 0
    try:
        while True:
            if tick % every == 0:
                line = progress_line(query())
                stream.write(("\r" + line) if is_tty else line + "\n")
                stream.flush()
            tick += 1
            await trio.sleep(interval)
    finally:
        line = progress_line(query())
        stream.write(("\r" + line + "\n") if is_tty else line + "\n")
        stream.flush()


@asynccontextmanager
async def progress_shown(query: Callable[[], dict[str, Any]]) -> AsyncIterator[None]:
    """Show the progress line for the body of the ``async with``; the last line stays."""
    async with open_nursery() as nursery:
        nursery.start_soon(show_progress, query)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def statistics_table(info: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """The final statistics as an aligned two-column table (query-migrate names)."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if key == "ram":
            continue
        rows.append((key, _fmt(key, value)))
    for key, value in info.get("ram", {}).items():
        rows.append((f"ram.{key}", _fmt(key, value)))
    for key, value in (extra or {}).items():
        rows.append((key, _fmt(key, value)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key in (
        "transferred",
        "remaining",
        "total",
        "normal-bytes",
        "precopy-bytes",
        "downtime-bytes",
        "postcopy-bytes",
    ):
        return f"{value} ({format_size(value)})"
    if key.endswith("time") or key in ("downtime", "expected-downtime"):
        return f"{value} ms"
    return str(value)
