"""What the ``trimig`` commands print: the query-migrate table, the progress line, JSON
output, and failures named in one line on stderr (``trimig: error: ...``).

The table has two presentations of the same rows: the final report of ``demo``,
``incoming`` and ``migrate`` names each row as query-migrate does (``ram.transferred``,
what ``--json`` prints), and ``trimig info migrate`` gives readable labels.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import trio

from .._trio import open_nursery, sole_error
from ..errors import TrimigError
from ..units import format_size

# --- messages ---------------------------------------------------------------------------------


def note(message: str) -> None:
    """Say something on stderr: ``trimig: MESSAGE``."""
    print(f"trimig: {message}", file=sys.stderr, flush=True)


def report_error(message: str) -> None:
    """Name a failure on stderr: one line, ``trimig: error: ...``."""
    note(f"error: {message}")


def one_line(exc: BaseException) -> str:
    """What went wrong, in one line: the error's text, with its cause when that adds to it,
    and the errors of a group (several tasks failed) joined."""
    exc = sole_error(exc)
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(one_line(inner) for inner in exc.exceptions)
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        if detail and detail not in text:
            text += f": {detail}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def is_expected(exc: BaseException) -> bool:
    """Whether trimig raised ``exc`` on purpose (not a bug or an unexpected OS error)."""
    return isinstance(sole_error(exc), TrimigError)


def describe(exc: BaseException) -> str:
    """:func:`one_line`, led by the error's type when trimig did not raise it on purpose."""
    message = one_line(exc)
    if not is_expected(exc):
        message = f"{type(sole_error(exc)).__name__}: {message}"
    return message


def print_json(
    value: Any, *, out: TextIO | None = None, sort_keys: bool = False, indent: int | None = None
) -> None:
    """One JSON value on ``out`` (stdout): on one line, or ``indent``-ed for people."""
    print(json.dumps(value, sort_keys=sort_keys, indent=indent), file=out or sys.stdout, flush=True)


# --- the query-migrate table --------------------------------------------------------------------

#: The query-migrate fields trimig knows (top level, then ``ram``), in the order
#: ``trimig info migrate`` shows them: readable label and unit.
FIELDS: dict[str, tuple[str, str]] = {
    "status": ("status", "text"),
    "total-time": ("total time", "ms"),
    "setup-time": ("setup time", "ms"),
    "downtime": ("downtime", "ms"),
    "expected-downtime": ("expected downtime", "ms"),
    "cpu-throttle-percentage": ("cpu throttle", "%"),
    "dirty-limit-throttle-time-per-round": ("dirty-limit throttle per round", "us"),
    "dirty-limit-ring-full-time": ("dirty-limit ring full time", "us"),
    "x-not-converging": ("not converging", "text"),
    "socket-address": ("socket address", "json"),
    "error-desc": ("error", "text"),
    "postcopy-blocktime": ("postcopy blocktime", "ms"),
    "transferred": ("transferred", "bytes"),
    "remaining": ("remaining", "bytes"),
    "total": ("total", "bytes"),
    "duplicate": ("zero pages", "pages"),
    "normal": ("normal pages", "pages"),
    "normal-bytes": ("normal bytes", "bytes"),
    "dirty-pages-rate": ("dirty rate", "pages/s"),
    "mbps": ("throughput", "Mbit/s"),
    "dirty-sync-count": ("dirty syncs (passes)", "text"),
    "postcopy-requests": ("postcopy requests", "text"),
    "page-size": ("page size", "bytes"),
    "pages-per-second": ("pages per second", "text"),
    "precopy-bytes": ("precopy bytes", "bytes"),
    "downtime-bytes": ("downtime bytes", "bytes"),
    "postcopy-bytes": ("postcopy bytes", "bytes"),
    "multifd-bytes": ("multifd bytes", "bytes"),
}

_READABLE: dict[str, Callable[[Any], str]] = {
    "text": str,
    "json": json.dumps,
    "ms": lambda v: f"{v} ms",
    "%": lambda v: f"{v} %",
    "bytes": lambda v: f"{format_size(v)} ({v} bytes)" if isinstance(v, int) else str(v),
    "pages": lambda v: f"{v} pages",
    "pages/s": lambda v: f"{v} pages/s",
    "Mbit/s": lambda v: f"{v:.1f} Mbit/s" if isinstance(v, int | float) else str(v),
}


def format_value(key: str, value: Any, *, readable: bool = False) -> str:
    """One field's value: with its unit (``1.0 GiB (1073741824 bytes)``) when ``readable``,
    else as query-migrate has it, a size or a time annotated (``1073741824 (1.0 GiB)``)."""
    unit = FIELDS[key][1] if key in FIELDS else None
    if readable:
        return _READABLE[unit](value) if unit is not None else json.dumps(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if unit == "bytes":
        return f"{value} ({format_size(value)})"
    if unit == "ms":
        return f"{value} ms"
    return str(value)


def table_rows(info: dict[str, Any], *, readable: bool = False) -> list[tuple[str, str]]:
    """The rows of a query-migrate reply (or any dict of its shape): its values first,
    then each dict in it (``ram``), under its name. ``readable`` rows have labels, known
    fields first, and a dict's rows indented under ``name:``; the others are named as
    query-migrate names them (``ram.transferred``)."""
    values = {key: value for key, value in info.items() if not isinstance(value, dict)}
    if readable:
        values = {key: values[key] for key in FIELDS if key in values} | values
    rows = [
        (
            FIELDS[key][0] if readable and key in FIELDS else key,
            format_value(key, value, readable=readable),
        )
        for key, value in values.items()
    ]
    for name, section in info.items():
        if not isinstance(section, dict):
            continue
        if readable:
            rows.append((f"{name}:", ""))
            rows += [("  " + label, text) for label, text in table_rows(section, readable=True)]
        else:
            rows += [(f"{name}.{key}", text) for key, text in table_rows(section)]
    return rows


def render(rows: list[tuple[str, str]]) -> str:
    """Rows as an aligned two-column table."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)


def format_migrate_info(info: dict[str, Any]) -> str:
    """A readable table of a query-migrate reply (``trimig info migrate``)."""
    if not info:
        return "no migration has run"
    return render(table_rows(info, readable=True))


def format_status(result: dict[str, Any]) -> str:
    """A query-status reply (``trimig info status``)."""
    return render(
        [("running", json.dumps(result.get("running"))), ("status", result.get("status", "?"))]
    )


def format_bitmaps(result: dict[str, Any]) -> str:
    """An x-dump-bitmaps reply (``trimig info bitmaps``): its text, as it is."""
    return str(result.get("text", "")).rstrip("\n")


def format_capabilities(result: list[dict[str, Any]]) -> str:
    """A query-migrate-capabilities reply: each capability on or off."""
    return render([(entry["capability"], "on" if entry["state"] else "off") for entry in result])


def format_parameters(result: dict[str, Any]) -> str:
    """A query-migrate-parameters reply."""
    return render([(name, json.dumps(value)) for name, value in result.items()])


def report_outcome(info: dict[str, Any], error: BaseException | None, as_json: bool) -> int:
    """A command's end: :func:`report` its statistics, and its ``error`` (if any) in one line
    on stderr; the exit status, 1 after an error."""
    report(info, as_json)
    if error is not None:
        report_error(one_line(error))
        return 1
    return 0


def report(info: dict[str, Any], as_json: bool) -> None:
    """Print a command's final statistics: a table for people, one JSON object for programs.

    ``info`` is a query-migrate reply, with ``verified`` and ``verdict`` (the moved guest's
    check), ``destination`` (its side, JSON only) and ``guest`` (the source guest's state)
    where the command has them."""
    if as_json:
        print_json(info, sort_keys=True)
        return
    body = {
        k: v for k, v in info.items() if k not in ("verified", "verdict", "destination", "guest")
    }
    extra: dict[str, Any] = {k: v for k, v in info.items() if k == "verified"}
    verdict = info.get("verdict") or {}
    if verdict.get("detail"):
        extra["verdict"] = verdict["detail"]
    if info.get("guest"):
        extra["guest"] = info["guest"]
    print(render(table_rows(body) + table_rows(extra)), flush=True)


# --- the progress line --------------------------------------------------------------------------


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
    elif "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    if info.get("cpu-throttle-percentage"):
        parts.append(f"throttle {info['cpu-throttle-percentage']}%")
    if isinstance(info.get("x-not-converging"), str) and info.get("status") == "active":
        parts.append(f"not converging: {info['x-not-converging']}")
    if "error-desc" in info:
        parts.append(f"error: {info['error-desc']}")
    return "  ".join(parts)


class ProgressLine:
    """The progress line on ``stream`` (stderr), for a local migration and ``trimig watch``:
    redrawn in place on a terminal; elsewhere a line each time the status or the pass
    changes, and otherwise one every ``every`` seconds."""

    def __init__(self, stream: TextIO | None = None, *, every: float = 1.0) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._every = every
        self._last: tuple[Any, ...] | None = None
        self._last_line: str | None = None
        self._last_time = 0.0

    def show(self, info: dict[str, Any], passes: int | None = None) -> None:
        line = progress_line(info, passes)
        if self._tty:
            self._stream.write(f"\r\x1b[K{line}")
        else:
            key = (info.get("status"), pass_count(info, passes))
            now = time.monotonic()
            if key == self._last and now - self._last_time < self._every:
                return
            self._last, self._last_line, self._last_time = key, line, now
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self, info: dict[str, Any], passes: int | None = None) -> None:
        """The last line, which stays."""
        if self._tty:
            self._stream.write(f"\r\x1b[K{progress_line(info, passes)}\n")
        elif progress_line(info, passes) != self._last_line:
            self._stream.write(progress_line(info, passes) + "\n")
        self._stream.flush()


@asynccontextmanager
async def progress_shown(
    query: Callable[[], dict[str, Any]], *, interval: float = 0.2
) -> AsyncIterator[None]:
    """Show the progress line of ``query()`` (a query-migrate) every ``interval`` seconds
    for the body of the ``async with``; the last line stays."""
    line = ProgressLine()

    async def redraw() -> None:
        while True:
            line.show(query())
            await trio.sleep(interval)

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(redraw)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        line.finish(query())
