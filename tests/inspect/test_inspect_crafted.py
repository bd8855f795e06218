"""``trimig inspect`` of crafted streams, for what neither QEMU's recording nor trimig's
stream holds: configuration subsections, mapped-ram, XBZRLE, compressed pages, PACKAGED."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from inspect_streams import (
    BE32,
    BE64,
    PAGE,
    bad,
    capabilities,
    configuration,
    counted,
    eos,
    footer,
    header,
    mem_size,
    ram_start,
    subsection,
    word,
)

from trimig import codec
from trimig.codec.constants import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    MigCmd,
)
from trimig.inspect.walker import inspect_file

# --- crafted streams -------------------------------------------------------------------


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
