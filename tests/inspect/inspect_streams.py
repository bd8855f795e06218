"""What the ``trimig inspect`` tests share: the blocks of QEMU's recorded stream, a bad file's
check (its error names its offset), cut and patched copies of a stream, and the builders of
crafted streams (tests/inspect/test_inspect_crafted.py). The recorded streams themselves are
the ``recorded`` and ``qemu_report`` fixtures (conftest.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from trimig import codec
from trimig.codec.constants import (
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
)
from trimig.inspect.walker import BadStreamFile, inspect_file

PAGE = 4096
QEMU_BLOCKS = {
    "pc.ram": 4 << 20,
    "/rom@etc/acpi/tables": 128 << 10,
    "pc.bios": 256 << 10,
    "pc.rom": 128 << 10,
    "/rom@etc/table-loader": 4096,
    "/rom@etc/acpi/rsdp": 4096,
}


def bad(path: Path) -> BadStreamFile:
    with pytest.raises(BadStreamFile) as info:
        inspect_file(path)
    error = info.value
    assert f"at offset {error.offset}" in str(error)
    assert error.report.error is not None and error.report.error.offset == error.offset
    return error


def cut(source: Path, size: int, target: Path) -> Path:
    with source.open("rb") as file:
        target.write_bytes(file.read(size))
    return target


def patched(source: Path, offset: int, data: bytes, target: Path) -> Path:
    raw = bytearray(source.read_bytes())
    raw[offset : offset + len(data)] = data
    target.write_bytes(raw)
    return target


BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


def counted(name: str) -> bytes:
    raw = name.encode()
    return bytes((len(raw),)) + raw


def configuration(machine: str, *subsections: bytes) -> bytes:
    return b"\x07" + BE32.pack(len(machine)) + machine.encode() + b"".join(subsections)


def subsection(name: str, body: bytes) -> bytes:
    return b"\x05" + counted(name) + BE32.pack(1) + body


def capabilities(*names: str) -> bytes:
    return subsection(
        "configuration/capabilities",
        BE32.pack(len(names)) + b"".join(counted(name) for name in names),
    )


def ram_start(section_id: int = 2) -> bytes:
    return codec.encode_section_start(section_id, "ram", 0, 4)


def footer(section_id: int = 2) -> bytes:
    return codec.encode_section_footer(section_id)


def word(offset: int, flags: int) -> bytes:
    return BE64.pack(offset | flags)


def eos() -> bytes:
    return BE64.pack(RAM_SAVE_FLAG_EOS)


def mem_size(blocks: dict[str, int]) -> bytes:
    entries = b"".join(counted(name) + BE64.pack(size) for name, size in blocks.items())
    return word(sum(blocks.values()), RAM_SAVE_FLAG_MEM_SIZE) + entries


def header() -> bytes:
    return codec.encode_file_header()
