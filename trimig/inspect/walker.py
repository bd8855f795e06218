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

The walk is three layers, each a class on top of the one below: ``ram.py`` (the walk's
state and the RAM section), ``sections.py`` (header, configuration, page size, sections,
the VM description after EOF) and this module (:func:`inspect_file`, the top-level
records and commands).
"""

from __future__ import annotations

import mmap
import os

from trimig.codec._wire import Cursor, Incomplete, Malformed, decode_name
from trimig.codec.constants import MIG_CMD_MAX, MigCmd, SectionType
from trimig.errors import ConfigError, RemoteProtocolError
from trimig.inspect.extract import RamExtractor
from trimig.inspect.ram_section import BadAt
from trimig.inspect.report import Command, Problem, StreamReport
from trimig.inspect.sections import SectionWalker, StopWalk
from trimig.inspect.vmdesc import Mismatch


class BadStreamFile(RemoteProtocolError):
    """The file is not a well-formed stream; ``offset`` is where it went wrong and
    ``report`` what was read before."""

    def __init__(self, message: str, offset: int, report: StreamReport) -> None:
        super().__init__(message)
        self.offset = offset
        self.report = report


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


class _Walker(SectionWalker):
    """The top-level walk: the stream's parts in order, records up to EOF, commands."""

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
        except StopWalk as stop:
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
        except BadAt as exc:
            offset = exc.offset
            message = f"{exc} at offset {offset}"
        else:
            report.end_offset = self.pos
            return
        report.error = Problem(offset, message)
        raise BadStreamFile(message, offset, report)

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
