"""Encoders of the main migration stream: pure functions returning ``bytes``.

RAM records are encoded by :class:`trimig.codec.ram_records.RamRecordEncoder` (it keeps
per-channel state); everything else is here. Bad arguments raise
:class:`~trimig.errors.LocalProtocolError`. ``docs/wire-format.md`` shows the
bytes of each function's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from trimig.codec._wire import BE16, BE32, BE64, check_uint, encode_counted
from trimig.codec.constants import (
    MACHINE_TYPE,
    MAX_DISCARDS_PER_COMMAND,
    MAX_PACKAGED_SIZE,
    POSTCOPY_RAM_DISCARD_VERSION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    TARGET_PAGE_SIZE,
    MigCmd,
    SectionType,
)
from trimig.codec.events import RamBlockInfo
from trimig.codec.ram_records import encode_end_of_section, encode_mem_size
from trimig.errors import LocalProtocolError

if TYPE_CHECKING:
    from trimig.codec._wire import BytesLike

#: Longest machine type name trimig writes or accepts.
MAX_MACHINE_TYPE_LENGTH = 256


# --- Header and sections ----------------------------------------------------------


def encode_file_header() -> bytes:
    """Magic ``QEVM`` and version 3."""
    return BE32.pack(QEMU_VM_FILE_MAGIC) + BE32.pack(QEMU_VM_FILE_VERSION)


def encode_configuration(machine: str = MACHINE_TYPE) -> bytes:
    """The configuration section: ``0x07``, be32 length, machine type (no subsections)."""
    raw = machine.encode("utf-8")
    if not 0 < len(raw) <= MAX_MACHINE_TYPE_LENGTH:
        raise LocalProtocolError(
            f"machine type {machine!r} must be 1 to {MAX_MACHINE_TYPE_LENGTH} bytes"
        )
    return bytes((SectionType.CONFIGURATION,)) + BE32.pack(len(raw)) + raw


def encode_stream_start(machine: str = MACHINE_TYPE) -> bytes:
    """File header followed by the configuration section."""
    return encode_file_header() + encode_configuration(machine)


def _full_header(
    kind: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int
) -> bytes:
    return b"".join(
        (
            bytes((kind,)),
            BE32.pack(check_uint(section_id, 32, "section id")),
            encode_counted(idstr, "section idstr"),
            BE32.pack(check_uint(instance_id, 32, "instance id")),
            BE32.pack(check_uint(version_id, 32, "version id")),
        )
    )


def encode_section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """``QEMU_VM_SECTION_START`` header (the body and footer follow)."""
    return _full_header(SectionType.SECTION_START, section_id, idstr, instance_id, version_id)


def encode_section_full(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """``QEMU_VM_SECTION_FULL`` header (the body and footer follow)."""
    return _full_header(SectionType.SECTION_FULL, section_id, idstr, instance_id, version_id)


def encode_section_part(section_id: int) -> bytes:
    """``QEMU_VM_SECTION_PART`` header."""
    return bytes((SectionType.SECTION_PART,)) + BE32.pack(check_uint(section_id, 32, "section id"))


def encode_section_end(section_id: int) -> bytes:
    """``QEMU_VM_SECTION_END`` header."""
    return bytes((SectionType.SECTION_END,)) + BE32.pack(check_uint(section_id, 32, "section id"))


def encode_section_footer(section_id: int) -> bytes:
    """The footer: ``0x7e`` and the section id again."""
    return bytes((SectionType.SECTION_FOOTER,)) + BE32.pack(
        check_uint(section_id, 32, "section id")
    )


def encode_blob(data: BytesLike) -> bytes:
    """trimig's device-state body: be32 length, then the bytes."""
    raw = bytes(data)
    return BE32.pack(check_uint(len(raw), 32, "device state length")) + raw


def encode_device_section(
    section_id: int, idstr: str, instance_id: int, version_id: int, data: BytesLike
) -> bytes:
    """A whole non-RAM device: FULL header, blob body, footer."""
    if idstr == RAM_IDSTR:
        raise LocalProtocolError("RAM is not a device section; use the RAM encoders")
    return (
        encode_section_full(section_id, idstr, instance_id, version_id)
        + encode_blob(data)
        + encode_section_footer(section_id)
    )


def encode_ram_setup(section_id: int, blocks: Sequence[RamBlockInfo], *, postcopy: bool) -> bytes:
    """The RAM START section: header ("ram", 0, 4), MEM_SIZE list, EOS, footer."""
    return b"".join(
        (
            encode_section_start(section_id, RAM_IDSTR, RAM_INSTANCE_ID, RAM_VERSION_ID),
            encode_mem_size(blocks, postcopy=postcopy),
            encode_ram_section_close(section_id),
        )
    )


def encode_ram_section_close(section_id: int) -> bytes:
    """The close of every RAM section (START, PART or END): the body's EOS, the footer."""
    return encode_end_of_section() + encode_section_footer(section_id)


def encode_eof() -> bytes:
    """``QEMU_VM_EOF``."""
    return bytes((SectionType.EOF,))


def encode_vm_description(json: BytesLike) -> bytes:
    """``QEMU_VM_VMDESCRIPTION``: be32 length and the JSON text (after EOF only)."""
    raw = bytes(json)
    return (
        bytes((SectionType.VMDESCRIPTION,))
        + BE32.pack(check_uint(len(raw), 32, "VM description length"))
        + raw
    )


# --- Commands ----------------------------------------------------------------------


def encode_command(cmd: MigCmd, payload: bytes = b"") -> bytes:
    """The command frame: ``0x08``, be16 command, be16 length, payload."""
    return (
        bytes((SectionType.COMMAND,))
        + BE16.pack(cmd)
        + BE16.pack(check_uint(len(payload), 16, f"{cmd.name} payload length"))
        + payload
    )


def encode_open_return_path() -> bytes:
    return encode_command(MigCmd.OPEN_RETURN_PATH)


def encode_ping(value: int) -> bytes:
    return encode_command(MigCmd.PING, BE32.pack(check_uint(value, 32, "PING value")))


def encode_postcopy_advise(
    page_size_summary: int, target_page_size: int = TARGET_PAGE_SIZE
) -> bytes:
    """ADVISE with the OR of all block page sizes and the target page size."""
    payload = BE64.pack(check_uint(page_size_summary, 64, "page size summary")) + BE64.pack(
        check_uint(target_page_size, 64, "target page size")
    )
    return encode_command(MigCmd.POSTCOPY_ADVISE, payload)


def encode_postcopy_listen() -> bytes:
    return encode_command(MigCmd.POSTCOPY_LISTEN)


def encode_postcopy_run() -> bytes:
    return encode_command(MigCmd.POSTCOPY_RUN)


def encode_postcopy_ram_discard(block: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """One DISCARD command: 1 to 12 ``(start, length)`` byte ranges of ``block``."""
    if not 0 < len(ranges) <= MAX_DISCARDS_PER_COMMAND:
        raise LocalProtocolError(
            f"a POSTCOPY_RAM_DISCARD carries 1 to {MAX_DISCARDS_PER_COMMAND} ranges, "
            f"got {len(ranges)}"
        )
    parts = [bytes((POSTCOPY_RAM_DISCARD_VERSION,)), encode_counted(block, "RAM block name"), b"\0"]
    for start, length in ranges:
        start = check_uint(start, 64, "discard start")
        length = check_uint(length, 64, "discard length")
        if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or length == 0:
            raise LocalProtocolError(
                f"discard range ({start:#x}, {length:#x}) of {block!r} is empty or not page-aligned"
            )
        parts.append(BE64.pack(start) + BE64.pack(length))
    return encode_command(MigCmd.POSTCOPY_RAM_DISCARD, b"".join(parts))


def encode_postcopy_ram_discards(block: str, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """As many DISCARD commands as needed for ``ranges``, 12 ranges per command."""
    commands = []
    batch: list[tuple[int, int]] = []
    for item in ranges:
        batch.append(item)
        if len(batch) == MAX_DISCARDS_PER_COMMAND:
            commands.append(encode_postcopy_ram_discard(block, batch))
            batch = []
    if batch:
        commands.append(encode_postcopy_ram_discard(block, batch))
    return commands


def encode_packaged(blob: BytesLike) -> bytes:
    """PACKAGED: the command (be32 blob length) followed by the blob itself.

    The blob is a header-less stream: LISTEN, device sections, pings, RUN.
    """
    raw = bytes(blob)
    if len(raw) > MAX_PACKAGED_SIZE:
        raise LocalProtocolError(f"package of {len(raw)} bytes is too large")
    return encode_command(MigCmd.PACKAGED, BE32.pack(len(raw))) + raw


def encode_postcopy_resume() -> bytes:
    return encode_command(MigCmd.POSTCOPY_RESUME)


def encode_recv_bitmap(block: str) -> bytes:
    """RECV_BITMAP: ask for the received bitmap of ``block`` (recovery)."""
    return encode_command(MigCmd.RECV_BITMAP, encode_counted(block, "RAM block name"))


def encode_switchover_start() -> bytes:
    return encode_command(MigCmd.SWITCHOVER_START)
