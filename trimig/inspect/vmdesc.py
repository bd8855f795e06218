"""QEMU's VM description: finding it at the end of a file, and skipping the device
sections it describes.

QEMU writes ``0x06``, be32 length and a JSON document right after ``QEMU_VM_EOF``. Its
``devices`` list gives, for every FULL device section (keyed by idstr and instance id),
the size each field took in this very stream and the subsections that were sent; that
is the only way to find where a device section ends, as its state has no length on the
wire. Like ``scripts/analyze-migration.py`` the description is looked for at the end of
the file before the stream is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from trimig.codec._wire import BE32, Cursor, Malformed, decode_name
from trimig.codec.constants import SectionType

#: The description is looked for in this many bytes at the end of the file.
SEARCH_WINDOW = 64 << 20
#: At most this many candidate ``00 06`` pairs are tried.
MAX_CANDIDATES = 256


class Mismatch(Malformed):
    """The stream does not match its VM description at ``offset``."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Searchable(Protocol):
    def rfind(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...


@attrs.define
class VmDescription:
    """A parsed VM description, or one cut short by the end of the file (``data`` None)."""

    offset: int  # of the 0x06 byte
    length: int
    data: dict[str, Any] | None = None
    devices: dict[tuple[str, int], Mapping[str, Any]] = attrs.Factory(dict)

    @property
    def truncated(self) -> bool:
        return self.data is None

    @property
    def page_size(self) -> int | None:
        value = self.data.get("page_size") if self.data else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @classmethod
    def parse(cls, offset: int, raw: bytes) -> VmDescription:
        """Parse the JSON; raises Malformed saying what is wrong with it."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise Malformed(f"the VM description is not JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("devices", []), list):
            raise Malformed("the VM description is not an object with a 'devices' list")
        devices: dict[tuple[str, int], Mapping[str, Any]] = {}
        for entry in data.get("devices", []):
            if not isinstance(entry, dict):
                raise Malformed(
                    f"the VM description lists a device that is not an object: {entry!r:.80}"
                )
            name, instance = entry.get("name"), entry.get("instance_id")
            if not isinstance(name, str) or not isinstance(instance, int):
                raise Malformed(
                    f"a device of the VM description has no name and instance_id: "
                    f"{json.dumps(entry)[:80]}"
                )
            devices[(name, instance)] = entry
        return cls(offset, len(raw), data, devices)


def find_vm_description(
    data: _Searchable, view: memoryview, start: int, end: int
) -> VmDescription | None:
    """The VM description at the end of the stream ``view[start:end]``, if there is one.

    It is ``00 06 <be32 length> {...`` where the EOF byte 00 comes first and the JSON runs
    to the end of the file. A description whose length runs past the end (a truncated
    file) is returned with ``data`` None; a candidate whose JSON does not parse is not one.
    """
    low = max(start, end - SEARCH_WINDOW)
    limit = end
    for _ in range(MAX_CANDIDATES):
        at = data.rfind(b"\x00\x06", low, limit)
        if at < 0:
            return None
        limit = at + 1
        json_start = at + 6
        if json_start >= end or view[json_start] != ord("{"):
            continue
        length: int = BE32.unpack_from(view, at + 2)[0]
        if length == end - json_start:
            try:
                return VmDescription.parse(at + 1, bytes(view[json_start:end]))
            except Malformed:
                continue
        if length > end - json_start and bytes(view[json_start : json_start + 2]) == b'{"':
            return VmDescription(at + 1, length)
    return None


def _field_size(entry: Mapping[str, Any], field: Any, where: str) -> int:
    if not isinstance(field, dict):
        raise Malformed(f"the VM description of {where} has a field that is not an object")
    size, count = field.get("size"), field.get("array_len", 1)
    if not isinstance(size, int) or size < 0 or not isinstance(count, int) or count < 1:
        raise Malformed(
            f"the VM description gives no size for field {field.get('name')!r} of {where}"
        )
    return size * count


def skip_described(cursor: Cursor, entry: Mapping[str, Any], where: str) -> None:
    """Skip a device body (or a subsection's) the VM description ``entry`` describes
    (the cursor's positions are file offsets):
    its fields (each took ``size`` bytes, ``array_len`` times), then each subsection it
    lists: ``0x05``, the counted vmsd name, be32 version and the subsection's own body."""
    fields = entry.get("fields", [])
    if not isinstance(fields, list):
        raise Malformed(f"the VM description of {where} has no field list")
    cursor.skip(sum(_field_size(entry, field, where) for field in fields))
    subsections = entry.get("subsections", [])
    if not isinstance(subsections, list):
        raise Malformed(f"the VM description of {where} has a bad subsection list")
    for sub in subsections:
        if not isinstance(sub, dict):
            raise Malformed(f"the VM description of {where} has a bad subsection")
        expected = sub.get("vmsd_name")
        at = cursor.pos
        mark = cursor.u8()
        if mark != SectionType.SUBSECTION:
            raise Mismatch(
                f"{where}: expected subsection {expected!r} (byte 0x05), found byte "
                f"{mark:#04x}: the stream does not match its VM description",
                at,
            )
        name = decode_name(cursor.counted(), "subsection name")
        if expected is not None and name != expected:
            raise Mismatch(
                f"{where}: subsection {name!r} where the VM description lists {expected!r}",
                at,
            )
        cursor.be32()  # its version
        skip_described(cursor, sub, f"subsection {name!r} of {where}")
