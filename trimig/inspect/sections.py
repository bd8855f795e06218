"""Header, configuration and device sections of a saved stream, and the VM description.

:class:`SectionWalker` adds to :class:`~trimig.inspect.ram_section.RamWalker` the parts of a
stream around RAM: the file header, the configuration section with QEMU's configuration
subsections, the target page size (which must agree between them and the VM
description), a START/FULL/PART/END section with its footer (RAM's body is read by the
layer below, trimig's device state by its length, QEMU's with the VM description), and
what may follow QEMU_VM_EOF. Same contract as ``ram.py``, plus :class:`StopWalk` for a
device section that cannot be skipped.
"""

from __future__ import annotations

from trimig.codec._wire import Incomplete, Malformed, decode_name
from trimig.codec.constants import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_VERSION_ID,
    SectionType,
)
from trimig.inspect.ram_section import BadAt, RamWalker
from trimig.inspect.report import Configuration, Record, Section, VmDescriptionInfo
from trimig.inspect.vmdesc import VmDescription, find_vm_description, skip_described

#: The machine type of trimig's own streams, whose device sections are length-prefixed.
TRIMIG_MACHINE = "trimig"
MAX_MACHINE_TYPE_LENGTH = 256
CONFIGURATION_SUBSECTIONS = (
    "configuration/target-page-bits",
    "configuration/capabilities",
    "configuration/uuid",
)


class StopWalk(Exception):
    """A device section that cannot be skipped: the walk ends here."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class SectionWalker(RamWalker):
    """The header, configuration, page size, sections and the end of the stream."""

    # --- header and configuration -------------------------------------------------------

    def _header(self) -> None:
        start = self.begin()
        cursor = self.cursor("the file header")
        magic = cursor.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadAt(
                f"bad magic {magic:#010x} (expected {QEMU_VM_FILE_MAGIC:#010x}, 'QEVM'): "
                "not a migration stream",
                start,
            )
        version = cursor.be32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise BadAt(f"obsolete stream version {version} (only 3 is read)", start + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise BadAt(f"unsupported stream version {version} (only 3 is read)", start + 4)
        self.report.version = version
        self.pos = cursor.pos

    def _configuration(self) -> None:
        start = self.begin()
        cursor = self.cursor("the configuration section")
        if cursor.u8() != SectionType.CONFIGURATION:
            self.report.notes.append(
                "no configuration section (QEMU sends none for machine types up to 2.3)"
            )
            return
        length = cursor.be32()
        if not 0 < length <= MAX_MACHINE_TYPE_LENGTH:
            raise Malformed(f"configuration section with a machine type name of {length} bytes")
        machine = decode_name(cursor.take(length), "machine type")
        config = Configuration(offset=start, machine=machine)
        self.report.configuration = config
        self.trimig = machine == TRIMIG_MACHINE
        self.pos = cursor.pos
        while self.pos < self.end and self.view[self.pos] == SectionType.SUBSECTION:
            self._configuration_subsection(config)
        config.size = self.pos - start

    def _configuration_subsection(self, config: Configuration) -> None:
        start = self.begin()
        cursor = self.cursor("a configuration subsection")
        cursor.pos += 1
        name = decode_name(cursor.counted(), "subsection name")
        if not name.startswith("configuration/"):
            raise Malformed(f"subsection {name!r} after the configuration section")
        version = cursor.be32()
        value: object
        if name == "configuration/target-page-bits":
            bits = cursor.be32()
            if not 10 <= bits <= 30:
                raise Malformed(f"target-page-bits {bits} (a page of 1 KiB to 1 GiB expected)")
            config.target_page_bits = value = bits
        elif name == "configuration/capabilities":
            count = cursor.be32()
            if count > 256:
                raise Malformed(f"configuration/capabilities with {count} capabilities")
            capabilities = [decode_name(cursor.counted(), "capability") for _ in range(count)]
            config.capabilities = value = capabilities
            self.ignore_shared = "x-ignore-shared" in capabilities
            self.mapped_ram = "mapped-ram" in capabilities
        elif name == "configuration/uuid":
            raw = cursor.take(16)
            config.uuid = value = "-".join(
                raw[a:b].hex() for a, b in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 16))
            )
        else:
            known = ", ".join(CONFIGURATION_SUBSECTIONS)
            raise Malformed(f"unknown configuration subsection {name!r} (known: {known})")
        config.subsections.append(
            {
                "name": name,
                "version": version,
                "offset": start,
                "size": cursor.pos - start,
                "value": value,
            }
        )
        self.pos = cursor.pos

    def _page_size(self) -> None:
        """The target page size: from target-page-bits, else the VM description, else 4096;
        the two must agree."""
        report = self.report
        config = report.configuration
        if not self.trimig:
            self.vmdesc = find_vm_description(self.data, self.view, self.pos, self.end)
        described = self.vmdesc.page_size if self.vmdesc is not None else None
        if config is not None and config.target_page_bits is not None:
            page_size = 1 << config.target_page_bits
            if described is not None and described != page_size:
                assert self.vmdesc is not None
                raise BadAt(
                    f"page size differs: target-page-bits {config.target_page_bits} gives "
                    f"{page_size}, the VM description says {described}",
                    self.vmdesc.offset,
                )
            if self.trimig and page_size != 4096:
                raise BadAt(
                    f"page size differs: target-page-bits {config.target_page_bits} in a "
                    "trimig stream (trimig's page size is 4096)",
                    config.offset,
                )
            source = "configuration/target-page-bits"
        elif described is not None:
            assert self.vmdesc is not None
            if described < 1024 or described & (described - 1):
                raise BadAt(f"the VM description gives page size {described}", self.vmdesc.offset)
            page_size, source = described, "VM description"
        elif self.trimig:
            page_size, source = 4096, "trimig"
        else:
            page_size, source = 4096, "assumed: no target-page-bits or VM description"
        self.tps = report.page_size = page_size
        report.page_size_source = source
        if self.extractor is not None:
            self.extractor.page_size = page_size
        if self.vmdesc is not None and not self.vmdesc.truncated:
            report.vm_description = VmDescriptionInfo(
                self.vmdesc.offset, self.vmdesc.length, described, len(self.vmdesc.devices)
            )

    # --- sections -------------------------------------------------------------------

    def _start_full(self, kind: int) -> None:
        start = self.record_start
        cursor = self.cursor("a section header")
        cursor.pos += 1
        section_id = cursor.be32()
        idstr = decode_name(cursor.counted(), "section idstr")
        instance_id = cursor.be32()
        version_id = cursor.be32()
        self.pos = cursor.pos
        name = SectionType(kind).name.removeprefix("SECTION_")
        section = self.report.sections.get(section_id)
        if section is None:
            section = Section(section_id, idstr, instance_id, version_id)
            self.report.sections[section_id] = section
        elif (section.idstr, section.instance_id) != (idstr, instance_id):
            raise Malformed(
                f"{name} binds section id {section_id} to {idstr!r}/{instance_id}, but it is "
                f"bound to {section.idstr!r}/{section.instance_id}"
            )
        record = Record(name, start, in_package=self.package is not None)
        section.records.append(record)
        if idstr == RAM_IDSTR:
            if kind == SectionType.SECTION_FULL:
                raise Malformed("RAM sent as a FULL section")
            if version_id != RAM_VERSION_ID:
                raise Malformed(f"RAM section version {version_id} (only 4 exists)")
            self.ram_section = section_id
            self._ram_body()
        elif self.trimig:
            self._blob(record)
        else:
            self._described_device(section, kind)
        self._footer(section, record)

    def _part_end(self, kind: int) -> None:
        start = self.record_start
        cursor = self.cursor("a section header")
        cursor.pos += 1
        section_id = cursor.be32()
        name = SectionType(kind).name.removeprefix("SECTION_")
        section = self.report.sections.get(section_id)
        if section is None:
            raise Malformed(f"{name} of unknown section id {section_id}")
        self.pos = cursor.pos
        record = Record(name, start, in_package=self.package is not None)
        section.records.append(record)
        if section_id == self.ram_section:
            self._ram_body()
        elif self.trimig:
            self._blob(record)
        else:
            raise StopWalk(
                f"{name} of section {section_id} ({section.idstr!r}) at offset {start}: "
                "QEMU's iterable device sections other than RAM are not described by the VM "
                "description, so the rest of the stream cannot be read",
                start,
            )
        self._footer(section, record)

    def _footer(self, section: Section, record: Record) -> None:
        self.begin()
        cursor = self.cursor("a section footer")
        mark = cursor.u8()
        if mark != SectionType.SECTION_FOOTER:
            raise Malformed(
                f"Missing section footer for section {section.section_id} "
                f"({section.idstr!r}): byte {mark:#04x}"
            )
        section_id = cursor.be32()
        if section_id != section.section_id:
            raise Malformed(
                f"Mismatched section id {section_id} in the footer of section "
                f"{section.section_id} ({section.idstr!r})"
            )
        self.pos = cursor.pos
        record.size = self.pos - record.offset

    def _blob(self, record: Record) -> None:
        """trimig's device section body: be32 length, then the device's state."""
        self.begin()
        cursor = self.cursor("a device section's state")
        length = cursor.be32()
        record.data_offset = cursor.skip(length)
        record.data_size = length
        self.pos = cursor.pos

    def _described_device(self, section: Section, kind: int) -> None:
        start = self.record_start
        name = SectionType(kind).name.removeprefix("SECTION_")
        what = (
            f"{name} section {section.section_id} ({section.idstr!r} instance "
            f"{section.instance_id} version {section.version_id}) at offset {start}"
        )
        vmdesc = self.vmdesc
        if vmdesc is None:
            raise StopWalk(
                f"{what}: QEMU's device state carries no length; it is skipped with the VM "
                "description QEMU writes after QEMU_VM_EOF, and this file has none (the "
                "source suppressed it or migrated in postcopy, or the file was cut short)",
                start,
            )
        if vmdesc.truncated:
            self.record_start = vmdesc.offset
            raise Incomplete(f"the VM description ({vmdesc.length} bytes of JSON)")
        entry = vmdesc.devices.get((section.idstr, section.instance_id))
        if entry is None:
            raise StopWalk(f"{what}: the VM description does not describe it", start)
        vmsd_name = entry.get("vmsd_name")
        section.vmsd_name = vmsd_name if isinstance(vmsd_name, str) else None
        cursor = self.cursor(
            f"the device state of section {section.section_id} ({section.idstr!r})"
        )
        skip_described(cursor, entry, f"section {section.section_id} ({section.idstr!r})")
        self.pos = cursor.pos

    # --- the end ----------------------------------------------------------------------

    def _after_eof(self) -> None:
        start = self.begin()
        if start == self.end:
            if self.vmdesc is not None:
                raise BadAt(
                    f"the VM description found at offset {self.vmdesc.offset} is not the one "
                    "after QEMU_VM_EOF",
                    start,
                )
            return
        cursor = self.cursor("the VM description")
        kind = cursor.u8()
        if kind != SectionType.VMDESCRIPTION:
            shown = bytes(self.view[start : min(self.end, start + 16)]).hex(" ")
            raise Malformed(
                f"unexpected bytes {shown} after QEMU_VM_EOF (only a VM description may follow)"
            )
        length = cursor.be32()
        cursor.what = f"the VM description ({length} bytes of JSON)"
        json_at = cursor.skip(length)
        vmdesc = VmDescription.parse(start, bytes(self.view[json_at : json_at + length]))
        self.pos = cursor.pos
        if self.pos != self.end:
            raise BadAt(f"{self.end - self.pos} bytes after the VM description", self.pos)
        if self.vmdesc is not None and self.vmdesc.offset != start:
            raise BadAt(
                f"the VM description found at offset {self.vmdesc.offset} is not the one "
                "after QEMU_VM_EOF",
                start,
            )
        if self.report.vm_description is None:
            self.report.vm_description = VmDescriptionInfo(
                start, length, vmdesc.page_size, len(vmdesc.devices)
            )
