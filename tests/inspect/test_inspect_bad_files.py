"""``trimig inspect`` of bad files: truncated at many offsets, corrupted headers and
footers, wrong layout versions and page sizes, each named with its offset; the CLI's errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inspect_streams import (
    PAGE,
    bad,
    cut,
    patched,
)
from precopy_harness import one_json_object, run_trimig

from trimig import codec
from trimig.errors import ConfigError
from trimig.inspect.report import StreamReport
from trimig.inspect.walker import inspect_file

# --- bad files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"", 0, "stream truncated in the file header at offset 0"),
        (b"QEV", 0, "stream truncated in the file header at offset 0"),
        (b"QEVN\0\0\0\3", 0, "bad magic 0x5145564e (expected 0x5145564d, 'QEVM')"),
        (b"QEVM\0\0\0\2", 4, "obsolete stream version 2"),
        (b"QEVM\0\0\0\4", 4, "unsupported stream version 4"),
        (b"QEVM\0\0\0\3", 8, "stream truncated in the configuration section at offset 8"),
        (b"QEVM\0\0\0\3\7\0\0\0\0", 8, "machine type name of 0 bytes"),
        (b"QEVM\0\0\0\3\7\0\0\0\6trim", 8, "stream truncated in the configuration section"),
        (
            b"QEVM\0\0\0\3\7\0\0\0\2pc\5\x13configuration/bogus\0\0\0\1",
            15,
            "unknown configuration subsection 'configuration/bogus'",
        ),
        (b"QEVM\0\0\0\3\7\0\0\0\2pc\x42", 15, "unknown section type 0x42"),
        (b"QEVM\0\0\0\3\7\0\0\0\2pc", 15, "stream truncated before QEMU_VM_EOF"),
        (b"QEVM\0\0\0\3\7\0\0\0\2pc\0XYZ", 16, "unexpected bytes 58 59 5a after QEMU_VM_EOF"),
        (b"QEVM\0\0\0\3\7\0\0\0\2pc\3\0\0\0\1", 15, "END of unknown section id 1"),
    ],
)
def test_corrupted_starts(tmp_path: Path, data: bytes, offset: int, message: str) -> None:
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    error = bad(path)
    assert error.offset == offset
    assert message in str(error)


def truncation_points(report: StreamReport) -> Iterator[int]:
    """Offsets to cut the QEMU stream at: inside each part of it, and spread over it."""
    assert report.eof_offset is not None and report.vm_description is not None
    ram = next(s for s in report.sections.values() if s.idstr == "ram")
    yield from (1, 7, 8, 12, 20, 26, 27, 40, 60)  # header, configuration, RAM START
    yield from (ram.records[1].offset + delta for delta in (0, 3, 5, 13, 20, 5000))
    yield from range(4096, ram.records[-1].offset, 99_991)
    yield report.vm_description.offset + 7  # the first two bytes of the JSON
    yield report.vm_description.offset + 100
    yield report.file_size - 1


def test_truncated_qemu_stream_names_the_offset(
    recorded: dict[str, Path], qemu_report: StreamReport, tmp_path: Path
) -> None:
    ram = next(s for s in qemu_report.sections.values() if s.idstr == "ram")
    ram_end = ram.records[-1].offset + (ram.records[-1].size or 0)
    assert qemu_report.vm_description is not None
    description = qemu_report.vm_description.offset
    for size in truncation_points(qemu_report):
        path = cut(recorded["plain"], size, tmp_path / f"cut-{size}.mig")
        error = bad(path)
        message = str(error)
        assert "truncated" in message, (size, message)
        assert f"(the file ends at offset {size}" in message, (size, message)
        if size > description:
            assert error.offset == description, (size, message)
            assert "stream truncated in the VM description" in message
        else:
            assert error.offset <= size < ram_end, (size, message)
            assert size - error.offset <= 9 + 256 + PAGE, (size, message)
        path.unlink()
    # Cut inside the description's length: nothing says where the device sections end,
    # so the walk stops at the first one (saying the file may be cut short).
    path = cut(recorded["plain"], description + 3, tmp_path / "cut-length.mig")
    report = inspect_file(path)
    assert report.stopped is not None and "cut short" in report.stopped.message


def test_truncated_trimig_stream_everywhere(tmp_path: Path) -> None:
    """A small trimig stream cut at every offset: always an error naming the offset."""
    memory = bytes(range(256)) * 32
    records = codec.RamRecordEncoder()
    stream = b"".join(
        [
            codec.encode_stream_start(),
            codec.encode_ram_setup(0, [codec.RamBlockInfo("pc.ram", 4 * PAGE)], postcopy=False),
            codec.encode_section_end(0),
            *(bytes(p) for p in records.encode_pages("pc.ram", [0, PAGE], memory)),
            records.encode_zero_pages("pc.ram", [2 * PAGE, 3 * PAGE]),
            records.encode_end_of_section(),
            codec.encode_section_footer(0),
            codec.encode_device_section(1, "guest", 0, 1, b"state"),
            codec.encode_eof(),
        ]
    )
    path = tmp_path / "whole.mig"
    path.write_bytes(stream)
    assert inspect_file(path).complete
    pages_end = len(stream) - 60
    for size in [*range(0, 120), *range(120, pages_end, 13), *range(pages_end, len(stream))]:
        path.write_bytes(stream[:size])
        error = bad(path)
        assert "truncated" in str(error) and error.offset <= size, (size, str(error))


def test_corrupted_footer_and_subsection_in_the_qemu_stream(
    recorded: dict[str, Path], qemu_report: StreamReport, tmp_path: Path
) -> None:
    timer = next(s for s in qemu_report.sections.values() if s.idstr == "timer")
    record = timer.records[0]
    assert record.size is not None
    footer_at = record.offset + record.size - 5
    error = bad(patched(recorded["plain"], footer_at, b"\x7f", tmp_path / "footer.mig"))
    assert error.offset == footer_at
    assert "Missing section footer for section 0 ('timer'): byte 0x7f" in str(error)
    error = bad(patched(recorded["plain"], footer_at + 4, b"\x09", tmp_path / "id.mig"))
    assert "Mismatched section id 9 in the footer of section 0 ('timer')" in str(error)
    # The cpu section's first subsection: 0x05, its counted name "cpu/...", version.
    cpu = next(s for s in qemu_report.sections.values() if s.idstr == "cpu")
    raw = recorded["plain"].read_bytes()
    start = cpu.records[0].offset
    found = next(
        at for at in range(start, start + 2000) if raw[at] == 5 and raw[at + 2 : at + 6] == b"cpu/"
    )
    error = bad(patched(recorded["plain"], found, b"\x06", tmp_path / "sub.mig"))
    assert error.offset == found
    assert "section 5 ('cpu'): expected subsection 'cpu/" in str(error)
    assert "found byte 0x06: the stream does not match its VM description" in str(error)


def test_cli_errors(recorded: dict[str, Path], tmp_path: Path) -> None:
    missing = run_trimig("inspect", str(tmp_path / "nothing.mig"))
    assert missing.returncode == 1
    assert missing.stderr == f"trimig: error: {tmp_path / 'nothing.mig'}: no such file\n"
    as_json = run_trimig("inspect", str(tmp_path / "nothing.mig"), "--json")
    assert as_json.returncode == 1
    assert one_json_object(as_json.stdout)["status"] == "failed"
    path = cut(recorded["plain"], 5000, tmp_path / "short.mig")
    text = run_trimig("inspect", str(path))
    assert text.returncode == 1
    lines = text.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trimig: error: stream truncated in ")
    assert "(the file ends at offset 5000)" in lines[0]
    assert "pc-i440fx-7.2" in text.stdout  # what was read before
    failed = run_trimig("inspect", str(path), "--json")
    assert failed.returncode == 1
    info = one_json_object(failed.stdout)
    assert info["status"] == "failed" and info["error-desc"] == lines[0].removeprefix(
        "trimig: error: "
    )
    assert info["error-offset"] <= 5000 and info["complete"] is False
    outside = run_trimig("inspect", str(path), "--offset", "1M")
    assert outside.returncode == 1 and "lies outside" in outside.stderr


def test_extract_into_a_file_is_a_config_error(recorded: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        inspect_file(recorded["plain"], extract=target)
