"""Parsing and formatting of sizes and rates given on the command line or over QMP."""

from __future__ import annotations

import re

from .errors import ConfigError

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse ``"1G"``, ``"512M"``, ``"64KiB"`` or a plain byte count into bytes (binary units).

    Raises ConfigError naming ``what`` and the bad text.
    """
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"bad {what} {text!r}: expected a number with an optional K, M, G or T")
    number, suffix = match.groups()
    return int(float(number) * _SUFFIXES[suffix.upper()])


UNLIMITED = ("max", "unlimited", "inf")
"""The words of a rate that has no limit."""


def parse_rate(text: str | int, *, what: str = "rate") -> int:
    """Parse a rate in bytes per second (``"100M"``, ``"1G/s"``).

    ``"max"`` and ``0`` mean unlimited, returned as 0."""
    if isinstance(text, str):
        stripped = text.strip().lower()
        if stripped in UNLIMITED:
            return 0
        if stripped.endswith("/s"):
            text = text.strip()[:-2]
    return parse_size(text, what=what)


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary unit, e.g. ``1.5 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
