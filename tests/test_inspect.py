"""``trimig inspect``: QEMU 7.2's recorded streams (tests/data, see qemu_recording.py),
a stream ``trimig migrate exec:cat > FILE`` wrote, crafted streams for what neither
records (configuration subsections, mapped-ram, XBZRLE, compressed pages, PACKAGED), and
bad files: truncated at many offsets, corrupted headers and footers, wrong layout
versions and page sizes, each named with its offset."""

from __future__ import annotations

import json
import lzma
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import qemu_recording
from precopy_harness import DEADLINE, one_json_object, run_trimig

from trimig import codec
from trimig.codec.constants import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    MigCmd,
)
from trimig.errors import ConfigError
from trimig.guest.workload import FILL_CHUNK_PAGES, WORDS_PER_PAGE, WorkloadState, fill_chunk
from trimig.inspect.extract import block_file_name
from trimig.inspect.report import StreamReport
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


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The recorded QEMU streams, uncompressed: {"plain": path, "ignore-shared": path}."""
    directory = tmp_path_factory.mktemp("qemu-streams")
    paths = {}
    for key, name in (
        ("plain", "qemu-7.2-pc.mig.xz"),
        ("ignore-shared", "qemu-7.2-pc-ignore-shared.mig.xz"),
    ):
        path = directory / name.removesuffix(".xz")
        path.write_bytes(lzma.decompress((qemu_recording.DATA_DIR / name).read_bytes()))
        paths[key] = path
    return paths


@pytest.fixture(scope="module")
def qemu_report(recorded: dict[str, Path]) -> StreamReport:
    return inspect_file(recorded["plain"])


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


# --- QEMU 7.2's stream ------------------------------------------------------------------


def test_qemu_stream_header_configuration_and_description(qemu_report: StreamReport) -> None:
    report = qemu_report
    assert report.complete, report.stopped or report.error
    assert report.version == 3
    assert report.configuration is not None
    assert report.configuration.machine == "pc-i440fx-7.2"
    assert report.configuration.offset == 8
    assert report.configuration.subsections == []
    assert (report.page_size, report.page_size_source) == (4096, "VM description")
    assert report.eof_offset is not None and report.vm_description is not None
    assert report.vm_description.offset == report.eof_offset + 1
    assert report.end_offset == report.file_size
    assert report.vm_description.offset + 5 + report.vm_description.size == report.file_size


def test_qemu_stream_sections_tile_the_stream(qemu_report: StreamReport) -> None:
    """Every record has its id, version and size, and the records and commands cover the
    stream from the configuration to QEMU_VM_EOF without a gap."""
    report = qemu_report
    ram = [s for s in report.sections.values() if s.idstr == "ram"]
    assert len(ram) == 1
    assert (ram[0].instance_id, ram[0].version_id) == (0, 4)
    kinds = [record.kind for record in ram[0].records]
    assert kinds[0] == "START" and kinds[-1] == "END" and set(kinds[1:-1]) <= {"PART"}
    devices = [s for s in report.sections.values() if s.idstr != "ram"]
    assert report.vm_description is not None
    assert len(devices) == report.vm_description.devices == 30
    names = {(s.idstr, s.instance_id) for s in devices}
    for expected in (("timer", 0), ("cpu", 0), ("apic", 0), ("dma", 1), ("globalstate", 0)):
        assert expected in names
    assert all([r.kind for r in s.records] == ["FULL"] for s in devices)
    assert all(s.vmsd_name for s in devices)
    cpu = next(s for s in devices if s.idstr == "cpu")
    assert cpu.version_id == 12 and cpu.vmsd_name == "cpu"
    spans = sorted(
        [(r.offset, r.size) for s in report.sections.values() for r in s.records]
        + [(c.offset, c.size) for c in report.commands]
    )
    assert report.configuration is not None
    position = report.configuration.offset + report.configuration.size
    for offset, size in spans:
        assert offset == position and size
        position += size
    assert position == report.eof_offset
    assert ram[0].size == sum(r.size or 0 for r in ram[0].records)


def test_qemu_stream_ram_blocks_and_page_counts(qemu_report: StreamReport) -> None:
    report = qemu_report
    assert {name: block.size for name, block in report.blocks.items()} == QEMU_BLOCKS
    assert report.ram_total == sum(QEMU_BLOCKS.values())
    for block in report.blocks.values():
        # The guest never ran: every page was sent exactly once, as a page or a zero page.
        assert block.normal + block.zero == block.page_count == block.pages_sent
        assert block.gpa is None and block.page_size is None
    expected = qemu_recording.expected_pc_ram()
    nonzero = sum(1 for at in range(0, len(expected), PAGE) if any(expected[at : at + PAGE]))
    pc_ram = report.blocks["pc.ram"]
    assert (pc_ram.normal, pc_ram.zero) == (nonzero, 1024 - nonzero)
    assert nonzero == 481  # 480 non-zero image pages and the page of DATA_VALUE


def test_qemu_stream_extract_equals_the_loaded_contents(
    recorded: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ram"
    report = inspect_file(recorded["plain"], extract=out)
    assert report.extracted is not None
    assert sorted(report.extracted) == sorted(QEMU_BLOCKS)
    for name, size in QEMU_BLOCKS.items():
        path = Path(report.extracted[name])
        assert path.parent == out and path.name == block_file_name(name)
        assert path.stat().st_size == size
    assert (out / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()
    assert (out / "rom@etc_acpi_tables.ram").exists()
    bios = (out / "pc.bios.ram").read_bytes()
    assert bios[-16] == 0xEA  # the reset vector at 0xfffffff0: SeaBIOS's far jump


def test_qemu_stream_with_ignore_shared(recorded: dict[str, Path], tmp_path: Path) -> None:
    """x-ignore-shared: the configuration/capabilities subsection, and a guest address per
    MEM_SIZE entry."""
    report = inspect_file(recorded["ignore-shared"], extract=tmp_path)
    assert report.complete
    config = report.configuration
    assert config is not None and config.capabilities == ["x-ignore-shared"]
    assert [sub["name"] for sub in config.subsections] == ["configuration/capabilities"]
    assert config.subsections[0]["version"] == 1
    gpas = {name: block.gpa for name, block in report.blocks.items()}
    assert gpas["pc.ram"] == 0 and gpas["pc.bios"] == 0xFFFC0000 and gpas["pc.rom"] == 0xC0000
    assert (tmp_path / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()


def test_qemu_stream_without_its_description_stops_at_the_first_device(
    recorded: dict[str, Path], qemu_report: StreamReport, tmp_path: Path
) -> None:
    """Cut right after QEMU_VM_EOF: the RAM is all there, the device sections cannot be
    skipped; the walk stops at the first one, saying why, and exits 0."""
    assert qemu_report.eof_offset is not None
    path = cut(recorded["plain"], qemu_report.eof_offset + 1, tmp_path / "no-vmdesc.mig")
    report = inspect_file(path, extract=tmp_path / "ram")
    timer = next(s for s in qemu_report.sections.values() if s.idstr == "timer")
    assert report.stopped is not None and report.error is None and not report.complete
    assert report.stopped.offset == timer.records[0].offset
    assert "'timer'" in report.stopped.message and "VM description" in report.stopped.message
    assert all(b.pages_sent == b.page_count for b in report.blocks.values())
    assert (tmp_path / "ram" / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()
    result = run_trimig("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "trimig: inspect stopped: FULL section 0 ('timer'" in result.stderr
    assert "stopped" in result.stdout


def test_cli_on_the_qemu_stream(recorded: dict[str, Path], tmp_path: Path) -> None:
    text = run_trimig("inspect", str(recorded["plain"]))
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    assert "pc-i440fx-7.2" in text.stdout
    assert any(
        line.split()[:2] == ["pc.ram", "4194304"]
        for line in (line.strip() for line in text.stdout.splitlines())
    )
    assert "globalstate" in text.stdout
    result = run_trimig("inspect", str(recorded["plain"]), "--json", "--extract", str(tmp_path))
    assert result.returncode == 0, result.stderr
    info = one_json_object(result.stdout)
    assert info["complete"] is True and "error-desc" not in info
    assert info["configuration"]["machine"] == "pc-i440fx-7.2"
    blocks = {block["name"]: block for block in info["ram"]["blocks"]}
    assert blocks["pc.ram"]["normal"] == 481 and blocks["pc.ram"]["zero"] == 543
    sections = {s["idstr"]: s for s in info["sections"]}
    assert sections["ram"]["version-id"] == 4
    assert [r["type"] for r in sections["timer"]["records"]] == ["FULL"]
    assert info["extracted"]["pc.ram"] == str(tmp_path / "pc.ram.ram")
    assert (tmp_path / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()


@pytest.mark.skipif(shutil.which(qemu_recording.QEMU) is None, reason="QEMU is not installed")
def test_a_fresh_recording_with_the_installed_qemu(tmp_path: Path) -> None:
    """The recording procedure, run again with whatever QEMU is installed."""
    path = tmp_path / "fresh.mig"
    qemu_recording.record(path)
    report = inspect_file(path, extract=tmp_path / "ram")
    assert report.complete, report.stopped or report.error
    assert (tmp_path / "ram" / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()


# --- trimig's stream -----------------------------------------------------------------


def check_workload_memory(path: Path, state: WorkloadState) -> None:
    """The extracted block holds what the built-in workload guest had when it stopped:
    the random fill, and the counters ``pass + 1`` before the cursor, ``pass`` after."""
    pages = np.fromfile(path, dtype="<u8").reshape(-1, WORDS_PER_PAGE)
    assert len(pages) == state.page_count
    expected = np.full(state.page_count, state.passes, dtype=np.uint64)
    expected[: state.cursor] += np.uint64(1)
    assert np.array_equal(pages[:, 0], expected)
    for chunk, first in enumerate(range(0, len(pages), FILL_CHUNK_PAGES)):
        rows = pages[first : first + FILL_CHUNK_PAGES]
        fill = fill_chunk(state.seed, 0, chunk, len(rows))
        assert np.array_equal(rows[:, 1:], fill[:, 1:]), f"fill differs in chunk {chunk}"


def test_trimig_stream_saved_with_exec(tmp_path: Path) -> None:
    """``trimig migrate "exec:cat > FILE"`` of a running guest, inspected and extracted: the
    page counts add up, the memory is the guest's as its device state describes it, and
    ``trimig incoming "exec:cat FILE"`` loads the same file into a guest that verifies."""
    stream = tmp_path / "trimig.mig"
    options = ("--ram", "8M", "--dirty-rate", "32M", "--fill", "random", "--seed", "7")
    saved = run_trimig("migrate", f"exec:cat > {stream}", "--warmup", "0.3", "--json", *options)
    assert saved.returncode == 0, saved.stderr
    report = inspect_file(stream, extract=tmp_path / "ram")
    assert report.complete, report.error or report.stopped
    assert report.configuration is not None and report.configuration.machine == "trimig"
    assert report.page_size_source == "trimig"
    assert [c.name for c in report.commands] == ["SWITCHOVER_START"]
    ram = next(s for s in report.sections.values() if s.idstr == "ram")
    assert (ram.records[0].kind, ram.records[-1].kind) == ("START", "END")
    (block,) = report.blocks.values()
    assert (block.name, block.size) == ("pc.ram", 8 << 20)
    assert block.pages_sent == block.page_count == 2048
    assert block.normal + block.zero >= block.page_count
    sent = one_json_object(saved.stdout)["ram"]
    assert block.normal == sent["normal"] and block.zero == sent["duplicate"]
    (device,) = [s for s in report.sections.values() if s.idstr != "ram"]
    (record,) = device.records
    assert record.data_offset is not None and record.data_size is not None
    with stream.open("rb") as file:
        file.seek(record.data_offset)
        state = WorkloadState.from_bytes(file.read(record.data_size))
    assert (state.seed, state.fill, state.page_count) == (7, "random", 2048)
    check_workload_memory(tmp_path / "ram" / "pc.ram.ram", state)

    loaded = run_trimig("incoming", f"exec:cat {stream}", "--json", *options)
    assert loaded.returncode == 0, loaded.stderr
    destination = one_json_object(loaded.stdout)
    assert destination["verified"] is True  # the guest ran on from the same memory
    assert (destination["verdict"]["seed"], destination["verdict"]["page_count"]) == (7, 2048)


# --- crafted streams -------------------------------------------------------------------

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


def test_target_page_bits_sets_the_page_size(tmp_path: Path) -> None:
    """A 16 KiB target page (target-page-bits 14): records address 16 KiB pages."""
    big = 1 << 14
    page = bytes(range(256)) * (big // 256)
    stream = (
        header()
        + configuration("virt-9.2", subsection("configuration/target-page-bits", BE32.pack(14)))
        + ram_start()
        + mem_size({"mach-virt.ram": 4 * big})
        + eos()
        + footer()
        + codec.encode_section_end(2)
        + word(big, RAM_SAVE_FLAG_PAGE)
        + counted("mach-virt.ram")
        + page
        + word(3 * big, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE)
        + b"\0"
        + eos()
        + footer()
        + codec.encode_eof()
    )
    path = tmp_path / "virt.mig"
    path.write_bytes(stream)
    report = inspect_file(path, extract=tmp_path)
    assert report.complete
    assert (report.page_size, report.page_size_source) == (big, "configuration/target-page-bits")
    assert report.configuration is not None and report.configuration.target_page_bits == 14
    block = report.blocks["mach-virt.ram"]
    assert (block.page_count, block.normal, block.zero, block.pages_sent) == (4, 1, 1, 2)
    assert (tmp_path / "mach-virt.ram.ram").read_bytes() == bytes(big) + page + bytes(2 * big)


def test_xbzrle_and_compressed_pages_are_applied(tmp_path: Path) -> None:
    """QEMU's other page encodings: an XBZRLE delta on a page sent before, a zlib page."""
    first = bytes([7]) * PAGE
    # Unchanged 100 bytes, then 3 new bytes; unchanged 200, then 2 new bytes.
    delta = bytes([100, 3, 1, 2, 3]) + bytes([0xC8, 0x01, 2, 9, 9])
    updated = bytearray(first)
    updated[100:103] = b"\x01\x02\x03"
    updated[303:305] = b"\x09\x09"
    compressed_page = bytes(range(256)) * 16
    packed = zlib.compress(compressed_page)
    stream = (
        header()
        + configuration("pc-i440fx-2.12")
        + ram_start()
        + mem_size({"pc.ram": 4 * PAGE})
        + eos()
        + footer()
        + codec.encode_section_part(2)
        + word(PAGE, RAM_SAVE_FLAG_PAGE)
        + counted("pc.ram")
        + first
        + word(PAGE, RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_CONTINUE)
        + b"\x01"
        + struct.pack(">H", len(delta))
        + delta
        + word(2 * PAGE, RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_CONTINUE)
        + BE32.pack(len(packed))
        + packed
        + eos()
        + footer()
        + codec.encode_eof()
    )
    path = tmp_path / "xbzrle.mig"
    path.write_bytes(stream)
    report = inspect_file(path, extract=tmp_path)
    block = report.blocks["pc.ram"]
    assert (block.normal, block.xbzrle, block.compressed, block.pages_sent) == (1, 1, 1, 2)
    assert (tmp_path / "pc.ram.ram").read_bytes() == (
        bytes(PAGE) + bytes(updated) + compressed_page + bytes(PAGE)
    )
    assert report.page_size_source.startswith("assumed")


def test_trimig_postcopy_stream_with_commands_and_a_package(tmp_path: Path) -> None:
    """Everything trimig's codec writes: return-path commands, ADVISE and a hugepage
    block's page size in MEM_SIZE, ZERO/PAGE/HOOK records, DISCARD, a PACKAGED blob with
    its device section, RECV_BITMAP."""
    huge = 2 << 20
    blocks = [codec.RamBlockInfo("pc.ram", 16 * PAGE), codec.RamBlockInfo("pc.huge", huge, huge)]
    memory = np.random.default_rng(3).integers(0, 256, 16 * PAGE, dtype=np.uint8).tobytes()
    records = codec.RamRecordEncoder()
    package = (
        codec.encode_postcopy_listen()
        + codec.encode_device_section(1, "guest", 0, 1, b'{"state": 1}')
        + codec.encode_ping(3)
        + codec.encode_ping(0x42)
        + codec.encode_postcopy_run()
    )
    stream = b"".join(
        [
            codec.encode_stream_start(),
            codec.encode_open_return_path(),
            codec.encode_ping(1),
            codec.encode_postcopy_advise(PAGE | huge),
            codec.encode_ram_setup(0, blocks, postcopy=True),
            codec.encode_section_part(0),
            *(bytes(part) for part in records.encode_pages("pc.ram", [0, 2 * PAGE], memory)),
            records.encode_zero_pages("pc.ram", [PAGE]),
            records.encode_written("pc.huge", 0, 512),
            records.encode_end_of_section(),
            codec.encode_section_footer(0),
            codec.encode_switchover_start(),
            *codec.encode_postcopy_ram_discards("pc.ram", [(3 * PAGE, PAGE)]),
            codec.encode_ping(2),
            codec.encode_packaged(package),
            codec.encode_ping(4),
            codec.encode_section_end(0),
            *(bytes(p) for p in records.encode_pages("pc.ram", [15 * PAGE], memory)),
            records.encode_end_of_section(),
            codec.encode_section_footer(0),
            codec.encode_recv_bitmap("pc.ram"),
            codec.encode_eof(),
        ]
    )
    path = tmp_path / "postcopy.mig"
    path.write_bytes(stream)
    report = inspect_file(path, extract=tmp_path / "ram")
    assert report.complete, report.error
    assert [(c.name, c.in_package) for c in report.commands] == [
        ("OPEN_RETURN_PATH", False),
        ("PING", False),
        ("POSTCOPY_ADVISE", False),
        ("SWITCHOVER_START", False),
        ("POSTCOPY_RAM_DISCARD", False),
        ("PING", False),
        ("PACKAGED", False),
        ("POSTCOPY_LISTEN", True),
        ("PING", True),
        ("PING", True),
        ("POSTCOPY_RUN", True),
        ("PING", False),
        ("RECV_BITMAP", False),
    ]
    assert report.commands[1].detail == {"value": 1}
    assert report.commands[4].detail == {"block": "pc.ram", "ranges": 1}
    assert report.commands[6].detail == {"blob-size": len(package)}
    guest = report.sections[1]
    assert guest.idstr == "guest" and guest.records[0].in_package
    assert guest.records[0].data_size == len(b'{"state": 1}')
    pc_ram, pc_huge = report.blocks["pc.ram"], report.blocks["pc.huge"]
    assert (pc_ram.normal, pc_ram.zero, pc_ram.pages_sent) == (3, 1, 4)
    assert (pc_huge.page_size, pc_huge.hook, pc_huge.pages_sent) == (huge, 512, 512)
    assert any("written one-sided" in note for note in report.notes)
    expected = bytearray(16 * PAGE)
    for index in (0, 2, 15):
        expected[index * PAGE : (index + 1) * PAGE] = memory[index * PAGE : (index + 1) * PAGE]
    assert (tmp_path / "ram" / "pc.ram.ram").read_bytes() == bytes(expected)


def mapped_ram_stream(
    path: Path,
    contents: dict[str, tuple[bytes, list[bool]]],
    *,
    version: int = 1,
    page_size: int = PAGE,
) -> list[int]:
    """A QEMU 9.0 mapped-ram file: each MEM_SIZE entry has a header, then its bitmap and
    its pages at a 1 MiB-aligned offset; the stream goes on after the pages. Slots of zero
    pages hold stale bytes (0xee). Returns the offsets of the headers."""
    align = 1 << 20
    out = bytearray(
        header() + configuration("pc-q35-9.0", capabilities("mapped-ram")) + ram_start()
    )
    out += word(sum(len(data) for data, _ in contents.values()), RAM_SAVE_FLAG_MEM_SIZE)
    headers = []
    for name, (data, present) in contents.items():
        out += counted(name) + BE64.pack(len(data))
        headers.append(len(out))
        bitmap_offset = len(out) + 28
        bitmap_size = -(-len(present) // 64) * 8
        pages_offset = -(-(bitmap_offset + bitmap_size) // align) * align
        out += BE32.pack(version) + BE64.pack(page_size)
        out += BE64.pack(bitmap_offset) + BE64.pack(pages_offset)
        bits = bytearray(bitmap_size)
        for index, here in enumerate(present):
            if here:
                bits[index // 8] |= 1 << (index % 8)
        out += bits
        out += bytes(pages_offset - len(out))
        for index, here in enumerate(present):
            out += data[index * PAGE : (index + 1) * PAGE] if here else b"\xee" * PAGE
    out += eos() + footer() + codec.encode_section_end(2) + eos() + footer()
    out += codec.encode_eof()
    path.write_bytes(out)
    return headers


def test_mapped_ram_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ram = rng.integers(1, 256, 20 * PAGE, dtype=np.uint8).tobytes()
    present = [index % 3 != 0 for index in range(20)]
    bios = b"\x55" * (2 * PAGE)
    path = tmp_path / "mapped.mig"
    mapped_ram_stream(path, {"pc.ram": (ram, present), "pc.bios": (bios, [True, True])})
    report = inspect_file(path, extract=tmp_path / "ram")
    assert report.complete, report.error
    config = report.configuration
    assert config is not None and config.capabilities == ["mapped-ram"]
    block = report.blocks["pc.ram"]
    assert (block.normal, block.zero, block.pages_sent) == (sum(present), 7, 20)
    assert block.mapped_ram is not None and block.mapped_ram.pages_offset % (1 << 20) == 0
    expected = b"".join(
        ram[i * PAGE : (i + 1) * PAGE] if here else bytes(PAGE) for i, here in enumerate(present)
    )
    assert (tmp_path / "ram" / "pc.ram.ram").read_bytes() == expected
    assert (tmp_path / "ram" / "pc.bios.ram").read_bytes() == bios


def test_mapped_ram_layout_version_and_page_size(tmp_path: Path) -> None:
    contents = {"pc.ram": (bytes(4 * PAGE), [False] * 4)}
    (at,) = mapped_ram_stream(tmp_path / "v2.mig", contents, version=2)
    error = bad(tmp_path / "v2.mig")
    assert error.offset == at
    assert "mapped-ram header of RAM block 'pc.ram': layout version 2" in str(error)
    (at,) = mapped_ram_stream(tmp_path / "64k.mig", contents, page_size=65536)
    error = bad(tmp_path / "64k.mig")
    assert error.offset == at + 4
    assert "page size differs: 65536, the stream's is 4096" in str(error)


def test_page_size_of_the_description_differs_from_target_page_bits(tmp_path: Path) -> None:
    description = json.dumps({"page_size": 4096, "devices": []}).encode()
    stream = (
        header()
        + configuration("virt-9.2", subsection("configuration/target-page-bits", BE32.pack(16)))
        + codec.encode_eof()
    )
    path = tmp_path / "differs.mig"
    path.write_bytes(stream + codec.encode_vm_description(description))
    error = bad(path)
    assert error.offset == len(stream)
    assert "page size differs: target-page-bits 16 gives 65536, the VM description says 4096" in (
        str(error)
    )


def test_postcopy_advise_with_another_target_page_size(tmp_path: Path) -> None:
    stream = codec.encode_stream_start("pc-q35-8.2") + codec.encode_command(
        MigCmd.POSTCOPY_ADVISE, BE64.pack(8192) + BE64.pack(8192)
    )
    path = tmp_path / "advise.mig"
    path.write_bytes(stream + codec.encode_eof())
    error = bad(path)
    assert error.offset == len(codec.encode_stream_start("pc-q35-8.2"))
    assert "page size differs: POSTCOPY_ADVISE gives target page size 8192" in str(error)


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


def test_a_stream_at_an_offset_in_the_file(recorded: dict[str, Path], tmp_path: Path) -> None:
    """``file:PATH,offset=N``: the stream starts N bytes into the file."""
    path = tmp_path / "offset.mig"
    path.write_bytes(b"\xaa" * 4096 + recorded["plain"].read_bytes())
    report = inspect_file(path, start=4096, extract=tmp_path / "ram")
    assert report.complete and report.start == 4096
    assert report.configuration is not None and report.configuration.offset == 4096 + 8
    assert (tmp_path / "ram" / "pc.ram.ram").read_bytes() == qemu_recording.expected_pc_ram()
    result = subprocess.run(
        ["trimig", "inspect", str(path), "--offset", "4096", "--json"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert one_json_object(result.stdout)["start"] == 4096


def test_readme_example(tmp_path: Path) -> None:
    """The README's commands run as written (only the size and paths adapted)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r"## Reading a saved stream\n.*?```sh\n(.*?)```", text, re.S)
    assert match, "README has no example under 'Reading a saved stream'"
    script = (
        match.group(1)
        .replace("/tmp/guest.mig", str(tmp_path / "guest.mig"))
        .replace("/tmp/ram", str(tmp_path / "ram"))
        .replace("--ram 256M", "--ram 16M")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "machine         trimig" in result.stdout
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["complete"] is True
    assert (tmp_path / "ram" / "pc.ram.ram").stat().st_size == 16 << 20
