"""``trimig inspect`` of recorded streams: QEMU 7.2's (tests/data, see qemu_recording.py),
one ``trimig migrate exec:cat > FILE`` wrote, a stream at an offset in its file, and the
README's example."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import qemu_recording
from inspect_streams import (
    PAGE,
    QEMU_BLOCKS,
    cut,
)
from precopy_harness import DEADLINE, one_json_object, run_trimig

from trimig.guest.workload import FILL_CHUNK_PAGES, WORDS_PER_PAGE, WorkloadState, fill_chunk
from trimig.inspect.extract import block_file_name
from trimig.inspect.report import StreamReport
from trimig.inspect.walker import inspect_file

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


# --- the stream at an offset, the README's example ----------------------------------------


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
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
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
