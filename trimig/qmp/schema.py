"""A small QAPI-like argument checker producing QEMU's error wording.

Errors are :class:`QmpError` of class ``GenericError`` naming the argument by its full path
(``uri``, ``capabilities[0].state``, ``channels[0].addr.port``):

* ``Parameter 'uri' is missing``
* ``Invalid parameter type for 'uri', expected: string``
* ``Parameter 'foo' is unexpected``
* ``Parameter 'capability' does not accept value 'bogus'``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from .protocol import GENERIC_ERROR, QmpError


def _error(desc: str) -> QmpError:
    return QmpError(GENERIC_ERROR, desc)


def _wrong_type(path: str, expected: str) -> QmpError:
    return _error(f"Invalid parameter type for '{path}', expected: {expected}")


class ArgType(Protocol):
    """A checker for one value: returns the (unchanged) value or raises QmpError."""

    def check(self, value: Any, path: str) -> Any: ...


@attrs.frozen
class String:
    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _wrong_type(path, "string")
        return value


@attrs.frozen
class Boolean:
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _wrong_type(path, "boolean")
        return value


@attrs.frozen
class Integer:
    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, "integer")
        return value


@attrs.frozen
class AnyValue:
    def check(self, value: Any, path: str) -> Any:
        return value


@attrs.frozen
class Enum:
    """A string from a fixed set."""

    values: tuple[str, ...]

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _wrong_type(path, "string")
        if value not in self.values:
            raise _error(f"Parameter '{path}' does not accept value '{value}'")
        return value


@attrs.frozen
class ListOf:
    item: ArgType

    def check(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _wrong_type(path, "array")
        return [self.item.check(element, f"{path}[{i}]") for i, element in enumerate(value)]


@attrs.frozen
class Member:
    """A struct member: its type and whether it may be left out."""

    type: ArgType
    optional: bool = False


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@attrs.frozen
class Struct:
    """A JSON object with known members. ``open=True`` passes unknown members through
    unchecked (for commands whose members the engine validates, like migrate-set-parameters)."""

    members: Mapping[str, Member] = attrs.field(factory=dict)
    open: bool = False

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object")
        checked = self.check_members(value, path)
        for name in value:
            if name not in self.members:
                if not self.open:
                    raise _error(f"Parameter '{_join(path, name)}' is unexpected")
                checked[name] = value[name]
        return checked

    def check_members(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        """Check the known members only (in schema order, as QEMU's visitor does)."""
        checked: dict[str, Any] = {}
        for name, member in self.members.items():
            if name not in value:
                if not member.optional:
                    raise _error(f"Parameter '{_join(path, name)}' is missing")
                continue
            checked[name] = member.type.check(value[name], _join(path, name))
        return checked


@attrs.frozen
class Union:
    """A flat union: an object whose ``discriminator`` member (an enum) selects which further
    members are allowed. ``variants`` maps each discriminator value to a Struct or Union of the
    remaining members."""

    discriminator: str
    variants: Mapping[str, Struct | Union]

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object")
        self._check(value, path, frozenset())
        return dict(value)

    def _check(self, value: dict[str, Any], path: str, consumed: frozenset[str]) -> None:
        tag_path = _join(path, self.discriminator)
        if self.discriminator not in value:
            raise _error(f"Parameter '{tag_path}' is missing")
        tag = Enum(tuple(self.variants)).check(value[self.discriminator], tag_path)
        consumed = consumed | {self.discriminator}
        variant = self.variants[tag]
        if isinstance(variant, Union):
            variant._check(value, path, consumed)
            return
        variant.check_members(value, path)
        for name in value:
            if name not in consumed and name not in variant.members:
                raise _error(f"Parameter '{_join(path, name)}' is unexpected")
