"""A read-only, lenient walker over a migration stream saved to a file (QEMU's or trimig's).

It reads what a destination would, without being one: any machine type, QEMU's
configuration subsections, RAM records of every kind QEMU has sent (XBZRLE, zlib
compressed pages, multifd flushes, RDMA hooks) besides trimig's, mapped-ram's fixed-offset
layout, commands (PACKAGED blobs are walked too), and device sections: trimig's carry
their length; QEMU's are skipped with the VM description QEMU appends after EOF, or the
walk stops there and says why. The strict :class:`~trimig.codec.StreamDecoder` is for a
destination; this reuses only the codec's field cursor and constants.

Everything malformed (truncated, bad magic or version, a wrong mapped-ram layout version,
page sizes that differ, a missing footer, ...) raises :class:`BadStreamFile` naming the
file offset where it went wrong, with the report of what was read before.
"""

from __future__ import annotations

import mmap
import os
import zlib

from trimig.codec._wire import BE64, Cursor, Incomplete, Malformed, decode_name
from trimig.codec.constants import (
    MIG_CMD_MAX,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RAM_VERSION_ID,
    MigCmd,
    SectionType,
    describe_ram_flags,
)
from trimig.errors import ConfigError, RemoteProtocolError
from trimig.inspect.extract import RamExtractor
from trimig.inspect.report import (
    Command,
    Configuration,
    MappedRam,
    Problem,
    RamBlock,
    Record,
    Section,
    StreamReport,
    VmDescriptionInfo,
)
from trimig.inspect.vmdesc import Mismatch, VmDescription, find_vm_description, skip_described

#: The machine type of trimig's own streams, whose device sections are length-prefixed.
TRIMIG_MACHINE = "trimig"
MAX_MACHINE_TYPE_LENGTH = 256
#: mapped-ram (QEMU 9.0): the header after each MEM_SIZE entry.
MAPPED_RAM_HEADER_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28
#: The mapped-ram bitmap is an array of the host's unsigned longs (x86-64: 8 bytes).
MAPPED_RAM_BITMAP_WORD = 8
#: XBZRLE: the encoding byte after the block name.
ENCODING_FLAG_XBZRLE = 0x01
#: A zlib stream of one page is at most this much longer than the page (compressBound).
ZLIB_OVERHEAD = 64
CONFIGURATION_SUBSECTIONS = (
    "configuration/target-page-bits",
    "configuration/capabilities",
    "configuration/uuid",
)


class BadStreamFile(RemoteProtocolError):
    """The file is not a well-formed stream; ``offset`` is where it went wrong and
    ``report`` what was read before."""

    def __init__(self, message: str, offset: int, report: StreamReport) -> None:
        super().__init__(message)
        self.offset = offset
        self.report = report


class _FileCursor(Cursor):
    """The codec's field cursor over a file mapping: positions are file offsets."""

    def __init__(self, view: memoryview, pos: int, end: int, what: str) -> None:
        self.view = view
        self.pos = self._begin = pos
        self.end = end
        self.what = what


class _Bad(Exception):
    """Malformed input at a given offset (Malformed is at the current record's start)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Stop(Exception):
    """A device section that cannot be skipped: the walk ends here."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def inspect_file(
    path: str | os.PathLike[str],
    *,
    extract: str | os.PathLike[str] | None = None,
    start: int = 0,
) -> StreamReport:
    """Read the stream in ``path`` (from byte ``start``, as ``file:PATH,offset=N``).

    ``extract``: a directory to write each RAM block into (see ``extract.py``).
    Returns the report; it has ``stopped`` set when a device section could not be skipped.
    Raises ConfigError for a file that cannot be read and BadStreamFile for a bad one.
    """
    name = os.fspath(path)
    try:
        file = open(name, "rb")  # noqa: SIM115 (closed below, after the mapping)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{name}: {exc.strerror}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        if not 0 <= start <= size:
            raise ConfigError(f"offset {start} lies outside {name} ({size} bytes)")
        report = StreamReport(path=name, file_size=size, start=start)
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        view = memoryview(mapping) if mapping is not None else memoryview(b"")
        extractor = None
        try:
            if extract is not None:
                extractor = RamExtractor(extract, report.page_size)
                report.extracted = extractor.files
            _Walker(mapping or b"", view, start, size, report, extractor).run()
        finally:
            if extractor is not None:
                extractor.close()
            view.release()
            if mapping is not None:
                mapping.close()
    return report


class _Walker:
    def __init__(
        self,
        data: mmap.mmap | bytes,
        view: memoryview,
        start: int,
        end: int,
        report: StreamReport,
        extractor: RamExtractor | None,
    ) -> None:
        self.data = data
        self.view = view
        self.pos = start
        self.end = end
        self.file_end = end
        self.report = report
        self.extractor = extractor
        self.record_start = start
        self.tps = 4096
        self.trimig = False
        self.ignore_shared = False
        self.mapped_ram = False
        self.advised_summary: int | None = None
        self.last_block: RamBlock | None = None
        self.ram_section: int | None = None
        self.package: tuple[int, int] | None = None  # (offset, end) of the PACKAGED blob
        self.vmdesc: VmDescription | None = None

    # --- driving ------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._walk()
        finally:
            for block in self.report.blocks.values():
                if block.hook:
                    self.report.notes.append(
                        f"RAM block {block.name!r}: {block.hook} pages were written one-sided "
                        "(HOOK records of trimig's RDMA-shaped transport): they are not in "
                        "this file"
                    )
            if self.report.rdma_hooks:
                self.report.notes.append(
                    "RDMA hooks: pages that went over RDMA are not in this file"
                )
            if self.report.multifd_flushes:
                self.report.notes.append(
                    "MULTIFD_FLUSH records: pages sent on multifd channels are not in this file"
                )

    def _walk(self) -> None:
        report = self.report
        try:
            self._header()
            self._configuration()
            self._page_size()
            self._records()
            self._after_eof()
        except _Stop as stop:
            report.stopped = Problem(stop.offset, str(stop))
            return
        except Incomplete as exc:
            offset = self.record_start
            if self.package is not None:
                message = (
                    f"the PACKAGED blob at offset {self.package[0]} ends inside {exc.what} "
                    f"at offset {offset}"
                )
            elif exc.what == "a top-level record":
                message = (
                    f"stream truncated before QEMU_VM_EOF at offset {offset} (the file ends at "
                    f"offset {self.file_end}, between two records)"
                )
            else:
                message = (
                    f"stream truncated in {exc.what} at offset {offset} "
                    f"(the file ends at offset {self.file_end})"
                )
        except Malformed as exc:
            offset = exc.offset if isinstance(exc, Mismatch) else self.record_start
            message = f"{exc} at offset {offset}"
        except _Bad as exc:
            offset = exc.offset
            message = f"{exc} at offset {offset}"
        else:
            report.end_offset = self.pos
            return
        report.error = Problem(offset, message)
        raise BadStreamFile(message, offset, report)

    def cursor(self, what: str, pos: int | None = None) -> _FileCursor:
        return _FileCursor(self.view, self.pos if pos is None else pos, self.end, what)

    def begin(self, pos: int | None = None) -> int:
        """Start a record at ``pos`` (default: the current position)."""
        self.record_start = self.pos if pos is None else pos
        return self.record_start

    # --- header and configuration -------------------------------------------------------

    def _header(self) -> None:
        start = self.begin()
        cursor = self.cursor("the file header")
        magic = cursor.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise _Bad(
                f"bad magic {magic:#010x} (expected {QEMU_VM_FILE_MAGIC:#010x}, 'QEVM'): "
                "not a migration stream",
                start,
            )
        version = cursor.be32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise _Bad(f"obsolete stream version {version} (only 3 is read)", start + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise _Bad(f"unsupported stream version {version} (only 3 is read)", start + 4)
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
                raise _Bad(
                    f"page size differs: target-page-bits {config.target_page_bits} gives "
                    f"{page_size}, the VM description says {described}",
                    self.vmdesc.offset,
                )
            if self.trimig and page_size != 4096:
                raise _Bad(
                    f"page size differs: target-page-bits {config.target_page_bits} in a "
                    "trimig stream (trimig's page size is 4096)",
                    config.offset,
                )
            source = "configuration/target-page-bits"
        elif described is not None:
            assert self.vmdesc is not None
            if described < 1024 or described & (described - 1):
                raise _Bad(f"the VM description gives page size {described}", self.vmdesc.offset)
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

    # --- top-level records ----------------------------------------------------------

    def _records(self) -> None:
        """Top-level records up to QEMU_VM_EOF (or the end of a PACKAGED blob)."""
        view = self.view
        while True:
            pos = self.begin()
            if pos >= self.end:
                if self.package is not None:
                    return
                raise Incomplete("a top-level record")
            kind = view[pos]
            if kind == SectionType.COMMAND:
                self._command()
            elif kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
                self._start_full(kind)
            elif kind in (SectionType.SECTION_PART, SectionType.SECTION_END):
                self._part_end(kind)
            elif kind == SectionType.EOF:
                if self.package is not None:
                    raise Malformed("QEMU_VM_EOF inside a PACKAGED blob")
                self.report.eof_offset = pos
                self.pos += 1
                return
            elif kind == SectionType.VMDESCRIPTION:
                raise Malformed("VM description before QEMU_VM_EOF")
            elif kind == SectionType.CONFIGURATION:
                raise Malformed("configuration section after the start of the stream")
            elif kind == SectionType.SUBSECTION:
                raise Malformed("subsection (0x05) at top level")
            elif kind == SectionType.SECTION_FOOTER:
                raise Malformed("section footer (0x7e) outside a section")
            else:
                raise Malformed(f"unknown section type {kind:#04x}")

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
            raise _Stop(
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
            raise _Stop(
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
            raise _Stop(f"{what}: the VM description does not describe it", start)
        vmsd_name = entry.get("vmsd_name")
        section.vmsd_name = vmsd_name if isinstance(vmsd_name, str) else None
        cursor = self.cursor(
            f"the device state of section {section.section_id} ({section.idstr!r})"
        )
        skip_described(cursor, entry, f"section {section.section_id} ({section.idstr!r})")
        self.pos = cursor.pos

    # --- commands -------------------------------------------------------------------

    def _command(self) -> None:
        start = self.record_start
        cursor = self.cursor("a command header")
        cursor.pos += 1
        number = cursor.be16()
        length = cursor.be16()
        known = 0 < number < MIG_CMD_MAX and number != MigCmd.DEPRECATED_0
        name = MigCmd(number).name if known else f"UNKNOWN_{number}"
        cursor.what = f"command {name}"
        payload = cursor.pos
        cursor.need(length)
        detail: dict[str, object] = {}
        blob: tuple[int, int] | None = None
        if not known:
            self.report.notes.append(f"unknown command {number} at offset {start} skipped")
        elif number == MigCmd.PING and length == 4:
            detail["value"] = cursor.be32()
        elif number == MigCmd.POSTCOPY_ADVISE:
            detail.update(self._advise(cursor, length))
        elif number == MigCmd.POSTCOPY_RAM_DISCARD and length >= 3:
            cursor.u8()  # version
            name_length = cursor.u8()
            if 3 + name_length > length:
                raise Malformed(
                    f"POSTCOPY_RAM_DISCARD of {length} bytes names a block of {name_length}"
                )
            block = decode_name(cursor.take(name_length), "RAM block name")
            ranges = (length - 3 - name_length) // 16
            detail.update(block=block, ranges=ranges)
        elif number == MigCmd.RECV_BITMAP and length >= 1:
            name_length = cursor.u8()
            if 1 + name_length != length:
                raise Malformed(f"RECV_BITMAP of {length} bytes names a block of {name_length}")
            detail["block"] = decode_name(cursor.take(name_length), "RAM block name")
        elif number == MigCmd.PACKAGED:
            if length != 4:
                raise Malformed(f"PACKAGED with a {length}-byte length field (expected 4)")
            if self.package is not None:
                raise Malformed("PACKAGED inside a PACKAGED blob")
            size = cursor.be32()
            cursor.what = f"the PACKAGED blob of {size} bytes"
            blob = (cursor.skip(size), size)
            detail["blob-size"] = size
        self.pos = payload + length + (blob[1] if blob else 0)
        self.report.commands.append(
            Command(name, number, start, self.pos - start, detail, self.package is not None)
        )
        if blob is not None:
            self._packaged(start, *blob)

    def _advise(self, cursor: Cursor, length: int) -> dict[str, object]:
        if length == 0:
            return {"form": "dirty-bitmaps only"}
        if length != 16:
            raise Malformed(f"POSTCOPY_ADVISE with {length} bytes (expected 0 or 16)")
        summary = cursor.be64()
        target_page_size = cursor.be64()
        if target_page_size != self.tps:
            raise Malformed(
                f"page size differs: POSTCOPY_ADVISE gives target page size "
                f"{target_page_size}, the stream's is {self.tps}"
            )
        self.advised_summary = summary
        return {"page-size-summary": summary, "target-page-size": target_page_size}

    def _packaged(self, command: int, offset: int, size: int) -> None:
        """Walk the blob's records (LISTEN, device sections, PINGs, RUN) in place."""
        saved_end, resume = self.end, self.pos
        self.end, self.package = offset + size, (command, offset + size)
        self.pos = offset
        self._records()
        self.end, self.package, self.pos = saved_end, None, resume

    # --- RAM ------------------------------------------------------------------------

    def _ram_body(self) -> None:
        """RAM records up to EOS."""
        tps = self.tps
        mask = tps - 1
        view = self.view
        report = self.report
        extractor = self.extractor
        while True:
            if self.begin() >= self.end:
                raise Incomplete("a RAM section body (between records, before its EOS)")
            cursor = self.cursor("a RAM record")
            word = cursor.be64()
            flags = word & mask
            offset = word & ~mask
            if flags & RAM_SAVE_FLAG_MEM_SIZE:
                if flags != RAM_SAVE_FLAG_MEM_SIZE:
                    raise Malformed(f"RAM record flags {flags:#x} ({describe_ram_flags(flags)})")
                self.pos = cursor.pos
                self._mem_size(offset)
                continue
            base = flags & ~RAM_SAVE_FLAG_CONTINUE
            if base == RAM_SAVE_FLAG_EOS:
                self.pos = cursor.pos
                return
            if base == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                report.multifd_flushes += 1
                self.pos = cursor.pos
                continue
            if base == RAM_SAVE_FLAG_HOOK and not self.trimig:
                report.rdma_hooks += 1  # QEMU's RDMA: the pages went over RDMA, not here
                self.pos = cursor.pos
                continue
            if base not in (
                RAM_SAVE_FLAG_PAGE,
                RAM_SAVE_FLAG_ZERO,
                RAM_SAVE_FLAG_XBZRLE,
                RAM_SAVE_FLAG_COMPRESS_PAGE,
                RAM_SAVE_FLAG_HOOK,
            ):
                raise Malformed(
                    f"unsupported RAM record flags {flags:#x} ({describe_ram_flags(flags)})"
                )
            if self.mapped_ram:
                raise Malformed(
                    f"RAM record {describe_ram_flags(flags)} in a mapped-ram stream (its pages "
                    "are at fixed offsets)"
                )
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = self.last_block
                if block is None:
                    raise Malformed("CONTINUE but no previous block")
            else:
                block = self._named_block(cursor)
            pages = 1
            if base == RAM_SAVE_FLAG_HOOK:
                pages = cursor.be32()
                if pages < 1:
                    raise Malformed("HOOK record for 0 pages")
            if offset + pages * tps > block.size:
                raise Malformed(
                    f"Illegal RAM offset {offset:#x} in block {block.name!r} of size "
                    f"{block.size:#x}"
                )
            self.last_block = block
            index = offset // tps
            if base == RAM_SAVE_FLAG_PAGE:
                data_at = cursor.skip(tps)
                block.normal += 1
                if extractor is not None:
                    extractor.page(block.name, offset, view[data_at : data_at + tps])
            elif base == RAM_SAVE_FLAG_ZERO:
                fill = cursor.u8()
                block.zero += 1
                if fill:
                    block.nonzero_fill += 1
                if extractor is not None:
                    extractor.zero(block.name, offset, fill)
            elif base == RAM_SAVE_FLAG_XBZRLE:
                encoding = cursor.u8()
                if encoding != ENCODING_FLAG_XBZRLE:
                    raise Malformed(f"XBZRLE page with encoding byte {encoding:#04x}")
                length = cursor.be16()
                if length > tps:
                    raise Malformed(f"XBZRLE page of {length} bytes (at most {tps})")
                encoded = cursor.take(length)
                page = bytearray(
                    extractor.read(block.name, offset) if extractor is not None else tps
                )
                apply_xbzrle(page, encoded)
                block.xbzrle += 1
                if extractor is not None:
                    extractor.page(block.name, offset, page)
            elif base == RAM_SAVE_FLAG_COMPRESS_PAGE:
                length = cursor.be32()
                if length > tps + ZLIB_OVERHEAD:
                    raise Malformed(f"compressed page of {length} bytes")
                try:
                    page_bytes = zlib.decompress(cursor.take(length))
                except zlib.error as exc:
                    raise Malformed(f"compressed page does not decompress ({exc})") from None
                if len(page_bytes) != tps:
                    raise Malformed(f"compressed page of {len(page_bytes)} bytes, not {tps}")
                block.compressed += 1
                if extractor is not None:
                    extractor.page(block.name, offset, page_bytes)
            else:
                block.hook += pages
            block.sent[index : index + pages] = b"\x01" * pages
            self.pos = cursor.pos

    def _named_block(self, cursor: Cursor) -> RamBlock:
        name = decode_name(cursor.counted(), "RAM block name")
        block = self.report.blocks.get(name)
        if block is None:
            known = ", ".join(repr(known) for known in self.report.blocks) or "none"
            raise Malformed(f"unknown RAM block {name!r} (known: {known})")
        return block

    def _mem_size(self, total: int) -> None:
        """The MEM_SIZE list of RAM blocks (the word is read)."""
        report = self.report
        report.ram_total = total
        remaining = total
        listed: set[str] = set()
        while remaining > 0:
            self.begin()
            cursor = self.cursor("a MEM_SIZE entry")
            name = decode_name(cursor.counted(), "RAM block name")
            size = cursor.be64()
            if name in listed:
                raise Malformed(f"MEM_SIZE lists RAM block {name!r} twice")
            if size > remaining:
                raise Malformed(
                    f"RAM block {name!r} of {size} bytes: the sizes add up past the total {total}"
                )
            listed.add(name)
            remaining -= size
            page_size = self._mem_size_page_size(cursor)
            gpa = cursor.be64() if self.ignore_shared else None
            pages = -(-size // self.tps)
            block = report.blocks.get(name)
            if block is None or block.size != size:
                block = RamBlock(name, size, pages, sent=bytearray(pages))
                report.blocks[name] = block
            block.page_size, block.gpa = page_size, gpa
            if self.extractor is not None:
                self.extractor.open_block(name, size)
            self.pos = cursor.pos
            if self.mapped_ram:
                self._mapped_ram(block)

    def _mem_size_page_size(self, cursor: Cursor) -> int | None:
        """After POSTCOPY_ADVISE a hugepage block's entry carries its page size. Whether it
        does depends on the destination's own page size, which a file does not say: a
        be64 power of two of at least the target page size is taken for one (a block
        name cannot start with a zero byte, nor EOS or a guest address, usually, be one)."""
        if self.advised_summary is None or self.advised_summary == self.tps:
            return None
        if cursor.available < 8:
            return None
        value: int = BE64.unpack_from(self.view, cursor.pos)[0]
        if value < self.tps or value & (value - 1) or value > 1 << 34:
            return None
        cursor.pos += 8
        return value

    def _mapped_ram(self, block: RamBlock) -> None:
        """A block's mapped-ram header, its bitmap and its pages; the stream goes on after
        the pages (``pages_offset + size``)."""
        start = self.begin()
        cursor = self.cursor(f"the mapped-ram header of RAM block {block.name!r}")
        version = cursor.be32()
        if version != MAPPED_RAM_HEADER_VERSION:
            raise _Bad(
                f"mapped-ram header of RAM block {block.name!r}: layout version {version} "
                f"(only {MAPPED_RAM_HEADER_VERSION} is known)",
                start,
            )
        page_size = cursor.be64()
        if page_size != self.tps:
            raise _Bad(
                f"mapped-ram header of RAM block {block.name!r}: page size differs: "
                f"{page_size}, the stream's is {self.tps}",
                start + 4,
            )
        bitmap_offset = cursor.be64()
        pages_offset = cursor.be64()
        self.pos = cursor.pos
        bitmap_size = -(-block.page_count // (8 * MAPPED_RAM_BITMAP_WORD)) * (
            MAPPED_RAM_BITMAP_WORD
        )
        block.mapped_ram = MappedRam(
            start, version, page_size, bitmap_offset, pages_offset, bitmap_size
        )
        if bitmap_offset == 0 and pages_offset == 0:
            return  # an x-ignore-shared block: no space in the file
        if pages_offset % self.tps:
            raise _Bad(
                f"mapped-ram header of RAM block {block.name!r}: pages offset {pages_offset:#x} "
                f"is not a multiple of the page size {self.tps}",
                start + 20,
            )
        if bitmap_offset < self.pos or pages_offset < self.pos:
            raise _Bad(
                f"mapped-ram header of RAM block {block.name!r}: bitmap offset "
                f"{bitmap_offset:#x} or pages offset {pages_offset:#x} lies before the header",
                start + 12,
            )
        if bitmap_offset + bitmap_size > self.end:
            self.record_start = bitmap_offset
            raise Incomplete(f"the mapped-ram bitmap of RAM block {block.name!r}")
        if pages_offset + block.size > self.end:
            self.record_start = pages_offset
            raise Incomplete(f"the mapped-ram pages of RAM block {block.name!r}")
        bitmap = bytes(self.view[bitmap_offset : bitmap_offset + bitmap_size])
        present = [
            index for index in range(block.page_count) if bitmap[index >> 3] >> (index & 7) & 1
        ]
        block.normal = len(present)
        block.zero = block.page_count - block.normal
        block.sent[:] = b"\x01" * block.page_count
        if self.extractor is not None:
            for index in present:
                at = pages_offset + index * self.tps
                self.extractor.page(block.name, index * self.tps, self.view[at : at + self.tps])
        self.pos = pages_offset + block.size

    # --- the end ----------------------------------------------------------------------

    def _after_eof(self) -> None:
        start = self.begin()
        if start == self.end:
            if self.vmdesc is not None:
                raise _Bad(
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
            raise _Bad(f"{self.end - self.pos} bytes after the VM description", self.pos)
        if self.vmdesc is not None and self.vmdesc.offset != start:
            raise _Bad(
                f"the VM description found at offset {self.vmdesc.offset} is not the one "
                "after QEMU_VM_EOF",
                start,
            )
        if self.report.vm_description is None:
            self.report.vm_description = VmDescriptionInfo(
                start, length, vmdesc.page_size, len(vmdesc.devices)
            )


def apply_xbzrle(page: bytearray, encoded: bytes) -> None:
    """Apply an XBZRLE delta: pairs of (ULEB128 length of an unchanged run, ULEB128 length
    of a changed run and its new bytes). Raises Malformed for a delta that does not fit."""
    size = len(page)
    at = done = 0
    while at < len(encoded):
        first = at == 0
        unchanged, at = _uleb128(encoded, at)
        if not first and not unchanged:
            raise Malformed("XBZRLE delta with an empty unchanged run")
        done += unchanged
        changed, at = _uleb128(encoded, at)
        if not changed or done + changed > size or at + changed > len(encoded):
            raise Malformed("XBZRLE delta that does not fit the page")
        page[done : done + changed] = encoded[at : at + changed]
        done += changed
        at += changed


def _uleb128(data: bytes, at: int) -> tuple[int, int]:
    """A ULEB128 number of at most two bytes (QEMU's XBZRLE uses no longer ones)."""
    if at >= len(data):
        raise Malformed("XBZRLE delta cut short")
    value = data[at] & 0x7F
    if not data[at] & 0x80:
        return value, at + 1
    if at + 1 >= len(data) or data[at + 1] & 0x80:
        raise Malformed("XBZRLE delta with a bad length")
    return value | data[at + 1] << 7, at + 2
