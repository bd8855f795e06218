"""What ``trimig inspect`` found in a stream file, as a table for people or JSON.

Offsets are byte offsets in the file. A report describes the file as far as it was read:
``error`` says where a bad file went wrong, ``stopped`` where a device section could not
be skipped (QEMU's device state has no length on the wire; see ``docs/inspect.md``).
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class Record:
    """One START, PART, END or FULL record of a section: from its type byte to the end of
    its footer (``size`` is None for a record the inspector stopped in)."""

    kind: str
    offset: int
    size: int | None = None
    #: trimig's device sections: where the opaque device state lies, and its length.
    data_offset: int | None = None
    data_size: int | None = None
    in_package: bool = False

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {"type": self.kind, "offset": self.offset, "size": self.size}
        if self.data_offset is not None:
            info["data-offset"] = self.data_offset
            info["data-size"] = self.data_size
        if self.in_package:
            info["in-package"] = True
        return info


@attrs.define
class Section:
    """A section id and everything sent under it."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    records: list[Record] = attrs.Factory(list)
    #: QEMU's device sections: the vmsd name the VM description gives.
    vmsd_name: str | None = None

    @property
    def size(self) -> int:
        return sum(record.size or 0 for record in self.records)

    @property
    def kinds(self) -> str:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.kind] = counts.get(record.kind, 0) + 1
        return ",".join(kind if n == 1 else f"{kind}x{n}" for kind, n in counts.items())

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.section_id,
            "idstr": self.idstr,
            "instance-id": self.instance_id,
            "version-id": self.version_id,
            "size": self.size,
            "records": [record.to_json() for record in self.records],
        }
        if self.vmsd_name is not None:
            info["vmsd-name"] = self.vmsd_name
        return info


@attrs.define
class Command:
    """A ``QEMU_VM_COMMAND`` record."""

    name: str
    number: int
    offset: int
    size: int
    detail: dict[str, Any] = attrs.Factory(dict)
    in_package: bool = False

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "command": self.name,
            "number": self.number,
            "offset": self.offset,
            "size": self.size,
            **self.detail,
        }
        if self.in_package:
            info["in-package"] = True
        return info

    def describe(self) -> str:
        details = ", ".join(f"{key} {value}" for key, value in self.detail.items())
        return f"{self.name} ({details})" if details else self.name


@attrs.define
class MappedRam:
    """A block's mapped-ram header (QEMU 9.0's fixed-offset layout)."""

    header_offset: int
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int
    bitmap_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "header-offset": self.header_offset,
            "version": self.version,
            "page-size": self.page_size,
            "bitmap-offset": self.bitmap_offset,
            "bitmap-size": self.bitmap_size,
            "pages-offset": self.pages_offset,
        }


@attrs.define
class RamBlock:
    """A RAM block of the MEM_SIZE list and the page records sent for it.

    ``normal`` and ``zero`` count records (a page sent in two passes counts twice);
    ``pages_sent`` counts distinct pages. With mapped-ram every page is in the file:
    ``normal`` pages have their slot, the others are zero.
    """

    name: str
    size: int
    page_count: int
    page_size: int | None = None  # from MEM_SIZE in postcopy (a hugepage block)
    gpa: int | None = None  # from MEM_SIZE with x-ignore-shared
    mapped_ram: MappedRam | None = None
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    compressed: int = 0
    hook: int = 0  # trimig's one-sided writes: their pages are not in the file
    nonzero_fill: int = 0
    sent: bytearray = attrs.field(factory=bytearray, repr=False)

    @property
    def pages_sent(self) -> int:
        return self.page_count - self.sent.count(0)

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "pages": self.page_count,
            "normal": self.normal,
            "zero": self.zero,
            "pages-sent": self.pages_sent,
        }
        for key, value in (
            ("xbzrle", self.xbzrle),
            ("compressed", self.compressed),
            ("hook", self.hook),
            ("nonzero-fill", self.nonzero_fill),
        ):
            if value:
                info[key] = value
        if self.page_size is not None:
            info["page-size"] = self.page_size
        if self.gpa is not None:
            info["gpa"] = self.gpa
        if self.mapped_ram is not None:
            info["mapped-ram"] = self.mapped_ram.to_json()
        return info


@attrs.define
class Configuration:
    """The configuration section: machine type and subsections."""

    offset: int
    machine: str
    size: int = 0
    subsections: list[dict[str, Any]] = attrs.Factory(list)
    target_page_bits: int | None = None
    capabilities: list[str] | None = None
    uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "offset": self.offset,
            "size": self.size,
            "machine": self.machine,
            "subsections": self.subsections,
        }
        if self.target_page_bits is not None:
            info["target-page-bits"] = self.target_page_bits
        if self.capabilities is not None:
            info["capabilities"] = self.capabilities
        if self.uuid is not None:
            info["uuid"] = self.uuid
        return info


@attrs.define
class VmDescriptionInfo:
    """Where the VM description (``0x06``, be32 length, JSON) is, and what it says."""

    offset: int
    size: int
    page_size: int | None
    devices: int

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "size": self.size,
            "page-size": self.page_size,
            "devices": self.devices,
        }


@attrs.define
class Problem:
    """Where reading stopped, and why."""

    offset: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "message": self.message}


@attrs.define
class StreamReport:
    path: str
    file_size: int
    start: int = 0
    version: int | None = None
    configuration: Configuration | None = None
    page_size: int = 4096
    page_size_source: str = "assumed (x86)"
    sections: dict[int, Section] = attrs.Factory(dict)
    commands: list[Command] = attrs.Factory(list)
    ram_total: int | None = None
    blocks: dict[str, RamBlock] = attrs.Factory(dict)
    multifd_flushes: int = 0
    rdma_hooks: int = 0
    eof_offset: int | None = None
    vm_description: VmDescriptionInfo | None = None
    end_offset: int | None = None
    notes: list[str] = attrs.Factory(list)
    stopped: Problem | None = None
    error: Problem | None = None
    extracted: dict[str, str] | None = None

    @property
    def complete(self) -> bool:
        """The whole file was read and is a well-formed stream."""
        return self.error is None and self.stopped is None and self.end_offset is not None

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "file": self.path,
            "file-size": self.file_size,
            "start": self.start,
            "complete": self.complete,
            "version": self.version,
            "configuration": self.configuration.to_json() if self.configuration else None,
            "page-size": self.page_size,
            "page-size-source": self.page_size_source,
            "sections": [section.to_json() for section in self.sections.values()],
            "commands": [command.to_json() for command in self.commands],
            "ram": {
                "total": self.ram_total,
                "blocks": [block.to_json() for block in self.blocks.values()],
            },
            "eof-offset": self.eof_offset,
            "vm-description": self.vm_description.to_json() if self.vm_description else None,
            "end-offset": self.end_offset,
            "notes": self.notes,
            "stopped": self.stopped.to_json() if self.stopped else None,
        }
        if self.multifd_flushes:
            info["ram"]["multifd-flushes"] = self.multifd_flushes
        if self.rdma_hooks:
            info["ram"]["rdma-hooks"] = self.rdma_hooks
        if self.extracted is not None:
            info["extracted"] = self.extracted
        if self.error is not None:
            info["status"] = "failed"
            info["error-desc"] = self.error.message
            info["error-offset"] = self.error.offset
        return info

    def format(self) -> str:
        """The report as a few aligned tables."""
        lines = [f"file            {self.path} ({self.file_size} bytes)"]
        if self.start:
            lines.append(f"stream start    offset {self.start}")
        if self.version is not None:
            lines.append(f"header          QEVM, version {self.version}")
        config = self.configuration
        if config is not None:
            lines.append(f"machine         {config.machine}")
            for sub in config.subsections:
                value = sub.get("value")
                if isinstance(value, list):
                    value = ", ".join(value) or "none"
                lines.append(f"configuration   {sub['name']} (version {sub['version']}): {value}")
        lines.append(f"page size       {self.page_size} ({self.page_size_source})")
        if self.sections:
            lines += ["", "sections"]
            lines.append(
                f"  {'id':>4}  {'idstr':<32} {'inst':>4} {'ver':>4}  {'records':<16}"
                f" {'offset':>10} {'bytes':>10}"
            )
            for section in self.sections.values():
                name = section.idstr
                if section.vmsd_name and section.vmsd_name != name.rpartition("/")[2]:
                    name += f" ({section.vmsd_name})"
                first = section.records[0].offset if section.records else 0
                lines.append(
                    f"  {section.section_id:>4}  {name:<32} {section.instance_id:>4}"
                    f" {section.version_id:>4}  {section.kinds:<16} {first:>10}"
                    f" {section.size:>10}"
                )
        if self.commands:
            lines += ["", "commands"]
            for command in self.commands:
                where = " (in the PACKAGED blob)" if command.in_package else ""
                lines.append(f"  {command.offset:>10}  {command.describe()}{where}")
        if self.blocks:
            lines += ["", f"RAM blocks (total {self.ram_total} bytes)"]
            lines.append(
                f"  {'name':<28} {'size':>11} {'pages':>8} {'normal':>8} {'zero':>8}"
                f" {'sent':>8}  other"
            )
            for block in self.blocks.values():
                other = []
                if block.page_size is not None:
                    other.append(f"page size {block.page_size}")
                if block.gpa is not None:
                    other.append(f"gpa {block.gpa:#x}")
                if block.mapped_ram is not None:
                    other.append(f"mapped-ram pages at {block.mapped_ram.pages_offset}")
                for label, count in (
                    ("xbzrle", block.xbzrle),
                    ("compressed", block.compressed),
                    ("hook", block.hook),
                ):
                    if count:
                        other.append(f"{label} {count}")
                lines.append(
                    f"  {block.name:<28} {block.size:>11} {block.page_count:>8}"
                    f" {block.normal:>8} {block.zero:>8} {block.pages_sent:>8}  " + ", ".join(other)
                )
        lines.append("")
        if self.eof_offset is not None:
            lines.append(f"QEMU_VM_EOF     offset {self.eof_offset}")
        if self.vm_description is not None:
            desc = self.vm_description
            lines.append(
                f"VM description  offset {desc.offset}, {desc.size} bytes of JSON, "
                f"{desc.devices} devices"
            )
        if self.end_offset is not None:
            lines.append(f"end             offset {self.end_offset}")
        for note in self.notes:
            lines.append(f"note            {note}")
        if self.extracted is not None:
            for name, path in self.extracted.items():
                lines.append(f"extracted       {name} -> {path}")
        if self.stopped is not None:
            lines.append(f"stopped         {self.stopped.message}")
        if self.error is not None:
            lines.append(f"error           {self.error.message}")
        return "\n".join(lines)
