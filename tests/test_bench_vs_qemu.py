"""bench/vs_qemu.py without running it: options, the skip without QEMU, the QEMU guest's
firmware, the table. No migration and no timing here (benchmarks are never tests)."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def vs_qemu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vs_qemu", BENCH / "vs_qemu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults(vs_qemu: ModuleType) -> None:
    args = vs_qemu.parse_args([])
    assert (args.ram, args.rounds, args.dirty_rate) == ("1G", 3, "256M")
    assert args.cases.split(",") == ["precopy-unix", "precopy-tcp", "postcopy-unix"]
    assert args.preempt and args.extra and args.warmup and args.verify
    assert args.json is None


def test_options(vs_qemu: ModuleType) -> None:
    args = vs_qemu.parse_args(
        ["--ram", "256M", "--rounds", "5", "--json", "out.json", "--no-preempt", "--no-qemu"]
    )
    assert (args.ram, args.rounds, args.json) == ("256M", 5, "out.json")
    assert not args.preempt and args.no_qemu
    with pytest.raises(SystemExit):
        vs_qemu.parse_args(["--rounds", "0"])


def test_prewarm_writes_fresh_memory_and_frees_it(vs_qemu: ModuleType) -> None:
    """The leak check (conftest) sees the memfd closed again."""
    assert vs_qemu.parse_args(["--prewarm", "64M"]).prewarm == 64 << 20
    assert vs_qemu.parse_args([]).prewarm == 0
    warmed = vs_qemu.prewarm(64 << 20)
    assert warmed["prewarm_s"] >= 0 and warmed["prewarm_MBps"] > 0
    with pytest.raises(SystemExit):
        vs_qemu.parse_args(["--prewarm", "lots"])


def test_memory_settled_waits_for_the_counter_to_stand_still(
    vs_qemu: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = tmp_path / "reported_kib"
    counter.write_text("0")
    monkeypatch.setattr(vs_qemu, "REPORTED_KIB", str(counter))

    async def moving_then_still() -> float:
        async def bump() -> None:
            for value in range(1, 7):  # moves for about 1.5 s
                await asyncio.sleep(0.25)
                counter.write_text(str(value))

        task = asyncio.ensure_future(bump())
        waited = await vs_qemu.memory_settled(10.0)
        await task
        return waited

    waited = asyncio.run(moving_then_still())
    assert 2.2 <= waited < 5.0  # 1.5 s moving, then 1 s still
    assert asyncio.run(vs_qemu.memory_settled(0.6)) <= 1.0  # the bound holds
    monkeypatch.setattr(vs_qemu, "REPORTED_KIB", str(tmp_path / "absent"))
    assert asyncio.run(vs_qemu.memory_settled(10.0)) == 0.0


def test_missing_qemu_is_skipped_with_a_message(
    vs_qemu: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = vs_qemu.parse_args(["--qemu", str(tmp_path / "no-such-qemu")])
    setup = vs_qemu.Setup(args, str(tmp_path))
    assert setup.qemu is None
    assert "QEMU rows are skipped" in capsys.readouterr().err
    assert vs_qemu.rows_for("precopy-unix", setup) == [
        "trimig", "raw-memfd", "raw-anon", "trimig-cli", "trimig-demo"
    ]  # fmt: skip
    assert vs_qemu.rows_for("postcopy-unix", setup) == ["trimig"]


def test_rows_with_qemu(vs_qemu: ModuleType, tmp_path: Path) -> None:
    args = vs_qemu.parse_args(["--qemu", "/bin/true", "--no-extra"])
    setup = vs_qemu.Setup(args, str(tmp_path))
    assert vs_qemu.rows_for("precopy-tcp", setup) == ["qemu", "trimig", "raw-memfd", "raw-anon"]
    assert vs_qemu.rows_for("postcopy-unix", setup) == ["qemu", "trimig"]
    assert vs_qemu.rows_for("precopy-tls-tcp", setup) == ["qemu", "trimig"]  # raw: plaintext


def test_cases(vs_qemu: ModuleType) -> None:
    assert vs_qemu.parse_case("precopy-tcp") == (False, False, "tcp")
    assert vs_qemu.parse_case("precopy-tls-tcp") == (False, True, "tcp")
    assert vs_qemu.parse_case("postcopy-tls-tcp") == (True, True, "tcp")
    assert vs_qemu.parse_case("postcopy-unix") == (True, False, "unix")
    assert all(vs_qemu.parse_case(case)[2] in ("tcp", "unix") for case in vs_qemu.CASES)


def test_firmware_image(vs_qemu: ModuleType) -> None:
    image, rate = vs_qemu.firmware(0x100000, 0x3C100000, 256 << 20)
    assert len(image) == 0x10000
    assert image[0xFFF0:0xFFF5] == b"\xea\x00\x00\x00\xf0"  # ljmp $0xf000, $0
    first, last, per_tick, divisor = struct.unpack_from("<IIII", image, 0x200)
    assert (first, last) == (0x100000, 0x3C100000)
    assert per_tick > 0 and 0 < divisor < 0x10000
    assert abs(rate / (256 << 20) - 1) < 0.02
    idle, idle_rate = vs_qemu.firmware(0x100000, 0x3C100000, 0)
    assert struct.unpack_from("<I", idle, 0x208)[0] == 0 and idle_rate == 0


@pytest.mark.skipif(
    not (shutil.which("as") and shutil.which("objcopy")), reason="binutils not installed"
)
def test_firmware_matches_its_source(vs_qemu: ModuleType, tmp_path: Path) -> None:
    obj, binary = tmp_path / "guest.o", tmp_path / "guest.bin"
    subprocess.run(["as", "--32", "-o", obj, BENCH / "qemu_guest.S"], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, binary], check=True)
    assert binary.read_bytes() == vs_qemu.FIRMWARE_CODE


def test_table(vs_qemu: ModuleType) -> None:
    def sample(row: str, case: str, rate: float, total: float) -> dict[str, object]:
        return {
            "row": row, "case": case, "round": 0, "loadavg": (1.0, 1.0, 1.0),
            "throughput_MBps": rate, "total_ms": total, "source_all_s_per_gib": 0.5,
        }  # fmt: skip

    results = {
        "warmup": [],
        "samples": [
            sample("qemu", "precopy-unix", 2000, 500),
            sample("trimig", "precopy-unix", 1000, 1000),
            sample("raw-memfd", "precopy-unix", 4000, 250),
            sample("qemu", "postcopy-unix", 1000, 1000),
            sample("trimig", "postcopy-unix", 500, 2000),
        ],
    }
    text, summary = vs_qemu.summarise(results)
    trimig_precopy = next(line for line in text.splitlines() if line.startswith("trimig (QMP)"))
    assert trimig_precopy.split()[-2:] == ["0.50", "0.25"]  # of QEMU, of raw
    assert summary["postcopy-unix"]["trimig"]["total_ms"] == 2000
    assert "load average" in text
    assert "against" not in text  # no TLS case


def test_table_of_tls_against_plaintext(vs_qemu: ModuleType) -> None:
    def sample(row: str, case: str, rate: float) -> dict[str, object]:
        return {"row": row, "case": case, "round": 0, "loadavg": (1.0, 1.0, 1.0),
                "throughput_MBps": rate, "total_ms": 1000}  # fmt: skip

    results = {
        "warmup": [],
        "samples": [
            sample("qemu", "precopy-tcp", 2000),
            sample("trimig", "precopy-tcp", 1000),
            sample("qemu", "precopy-tls-tcp", 1000),
            sample("trimig", "precopy-tls-tcp", 800),
        ],
    }
    text, _ = vs_qemu.summarise(results)
    lines = text.splitlines()
    figures = lines[lines.index(next(line for line in lines if "against precopy-tcp" in line)) + 1]
    assert figures.split() == [
        "QEMU", "TLS", "/", "QEMU", "plain", "0.50,",
        "trimig", "TLS", "/", "trimig", "plain", "0.80,",
        "trimig", "TLS", "/", "QEMU", "TLS", "0.80",
    ]  # fmt: skip


def test_engine_memory_sees_a_process_allocate(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("engine_memory", BENCH / "engine_memory.py")
    assert spec is not None and spec.loader is not None
    engine_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_memory)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; block = bytearray(96 << 20); open(sys.argv[1], 'w').close(); "
            "time.sleep(60)",
            str(ready),
        ]
    )
    try:
        memory = engine_memory.PeakMemory({"child": child.pid})
        memory.sample()  # before or while it allocates
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        memory.sample()
        figures = memory.figures()
        assert figures["child_own_peak_MiB"] >= 96
        assert figures["child_hwm_MiB"] >= figures["child_own_peak_MiB"]
    finally:
        child.kill()
        child.wait()
    memory.sample()  # gone: the figures stay
    assert memory.figures() == figures
    assert engine_memory.overhead_budget(1 << 30) == (1 << 30) * 3 // 100 + (64 << 20)
