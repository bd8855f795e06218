"""Human output: a progress line on stderr while migrating, and the final statistics table."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import trio

from ._trio import open_nursery
from .units import format_size


def pass_count(info: dict[str, Any], passes: int | None) -> int | None:
    """The pass number: query-migrate's dirty-sync-count, or a newer MIGRATION_PASS."""
    ram = info.get("ram")
    synced = ram.get("dirty-sync-count") if isinstance(ram, dict) else None
    counts = [count for count in (synced, passes) if isinstance(count, int)]
    return max(counts) if counts else None


def progress_line(info: dict[str, Any], passes: int | None = None) -> str:
    """One line summarizing a query-migrate reply (``passes`` from MIGRATION_PASS if newer)."""
    if "status" not in info:
        return "waiting for a migration to start"
    parts = [f"{info['status']:<15}"]
    count = pass_count(info, passes)
    if count is not None:
        parts.append(f"pass {count}")
    ram = info.get("ram")
    if isinstance(ram, dict):
        total, remaining = ram.get("total", 0), ram.get("remaining", 0)
        parts.append(f"sent {format_size(ram.get('transferred', 0))}")
        if total:
            parts.append(f"{100.0 * (total - remaining) / total:5.1f}% of {format_size(total)}")
        parts.append(f"remaining {format_size(remaining)}")
        parts.append(f"{ram.get('mbps', 0):.1f} Mbit/s")
        parts.append(f"dirty {ram.get('dirty-pages-rate', 0)} pages/s")
        if ram.get("postcopy-requests"):
            parts.append(f"{ram['postcopy-requests']} page requests")
    if "total-time" in info:
        parts.append(f"{info['total-time'] / 1000:.1f} s")
    if "downtime" in info:
        parts.append(f"downtime {info['downtime']} ms")
    if "error-desc" in info:
        parts.append(f"error: {info['error-desc']}")
    return "  ".join(parts)


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
