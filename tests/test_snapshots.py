"""File snapshots (issue 12): ``file:`` URIs, mapped-ram, ``trimig snapshot`` / ``restore``
eager and lazy, through the CLI and through QMP engines, with the adversarial guest (holes,
random writes, a hugetlb block, every page checked at load-state and at verify), and bad
files that must be refused naming the offset. Everything is real: processes, files,
userfaultfd. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

import pytest
import trio
from adversarial_harness import DEADLINE, _connect, _Engine, _until_done, guest_command

from trimig.demo import running_guest
from trimig.errors import ConfigError, MigrationFailed
from trimig.guest.host import workload_command
from trimig.migration import MigrationCapabilities
from trimig.ram_blocks import default_block_specs
from trimig.savevm.outgoing import OutgoingMigration
from trimig.transports import FileAddress, parse_uri

TRIMIG = [sys.executable, "-m", "trimig.cli"]
LAYOUT = ["--ram", "16M", "--huge", "4M"]
TOTAL = (16 + 4) << 20
MiB = 1 << 20


def trimig(*args: str, timeout: float = DEADLINE) -> tuple[int, dict[str, Any], str]:
    """Run ``trimig ARGS --json``: exit status, the JSON printed last, stderr."""
    words = list(args)
    cut = words.index("--") if "--" in words else len(words)
    words[cut:cut] = ["--json"]
    done = subprocess.run([*TRIMIG, *words], capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, json.loads(lines[-1]) if lines else {}, done.stderr


def test_file_uris_parse_as_qemu() -> None:
    assert parse_uri("file:/tmp/x") == FileAddress("/tmp/x", 0)
    # QEMU takes everything after the first ",offset=" as the offset (qemu_strtosz).
    assert parse_uri("file:/a,b,offset=1M") == FileAddress("/a,b", MiB)
    assert FileAddress("/x", 4096).uri == "file:/x,offset=4096"
    with pytest.raises(ConfigError, match="empty file path"):
        parse_uri("file:")
    with pytest.raises(ConfigError, match="offset"):
        parse_uri("file:/x,offset=lots")


def test_mapped_ram_conflicts_are_refused() -> None:
    capabilities = MigrationCapabilities()
    capabilities.set("mapped-ram", True)
    with pytest.raises(ConfigError, match="incompatible with postcopy"):
        capabilities.set("postcopy-ram", True)
    assert not capabilities.postcopy_ram
    with pytest.raises(ConfigError, match="requires mapped-ram"):
        MigrationCapabilities().set("x-lazy-restore", True)


async def test_mapped_ram_needs_a_file_and_the_guest_runs_on() -> None:
    specs = default_block_specs(8 * MiB)
    capabilities = MigrationCapabilities()
    capabilities.set("mapped-ram", True)
    async with running_guest(specs, workload_command(dirty_rate="8M")) as (guest, blocks):
        outgoing = OutgoingMigration(guest, blocks, capabilities=capabilities)
        with trio.fail_after(DEADLINE), pytest.raises(MigrationFailed, match="seekable"):
            await outgoing.run("exec:cat > /dev/null")
        status = await guest.query()
        assert status["running"] and not status["dirty_tracked"]


@pytest.mark.usefixtures("hugepages")
def test_cli_adversarial_snapshot_then_eager_and_lazy_restore(tmp_path: Any) -> None:
    """A guest that starts from holes and writes at random (hugetlb block too) is saved
    live at an offset into a file, keeps running, and is restored twice from the one
    file: eagerly and lazily. Every page is checked at load-state and again at verify,
    after the restored guest wrote on."""
    path = str(tmp_path / "guest.snap")
    offset = "64K"
    guest = guest_command(seed=12, rate=1000.0)
    code, saved, stderr = trimig(
        "snapshot", path, "--offset", offset, "--keep-running", *LAYOUT, "--", *guest
    )
    assert code == 0, stderr
    assert saved["status"] == "completed" and saved["mapped-ram"] is True, saved
    assert saved["verified"] is True, saved  # it ran on after the save, consistently
    assert saved["ram"]["dirty-sync-count"] >= 2, saved
    # Each page has one slot: however often re-dirtied, the file stays about RAM's size.
    assert os.path.getsize(path) <= 64 * 1024 + TOTAL + 3 * MiB
    code, report, stderr = trimig("inspect", path, "--offset", offset)
    assert code == 0 and report["complete"], stderr
    for block in report["ram"]["blocks"]:
        assert block["normal"] + block["zero"] == block["pages"], block
        assert block["mapped-ram"]["pages-offset"] % MiB == 0, block
    assert any(block["zero"] for block in report["ram"]["blocks"]), "no holes were saved"
    for lazy in (False, True):
        mode = ["--lazy"] if lazy else []
        code, restored, stderr = trimig(
            "restore", path, "--offset", offset, *mode, *LAYOUT, "--", *guest
        )
        assert code == 0, stderr
        assert restored["mode"] == ("lazy" if lazy else "eager"), restored
        verdict = restored["verdict"]
        assert restored["verified"] is True and verdict["bad_pages"] == 0, restored
        assert "match the journal" in verdict["detail"], restored
        if lazy:
            # load-state read every page while they were still in the file
            assert restored["postcopy-requests"] > 0, restored
            assert restored["x-postcopy-latency-p99"] >= restored["x-postcopy-latency-p50"] > 0


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory: Any) -> str:
    path = str(tmp_path_factory.mktemp("snap") / "small.snap")
    code, _, stderr = trimig("snapshot", path, "--ram", "16M", "--dirty-rate", "8M")
    assert code == 0, stderr
    return path


def _corrupt(source: str, target: str, *, cut: int | None = None, patch: Any = None) -> None:
    with open(source, "rb") as file:
        data = bytearray(file.read())
    if cut is not None:
        del data[cut:]
    if patch is not None:
        at, raw = patch
        data[at : at + len(raw)] = raw
    with open(target, "wb") as file:
        file.write(data)


def _header_offset(path: str) -> int:
    code, report, stderr = trimig("inspect", path)
    assert code == 0, stderr
    return int(report["ram"]["blocks"][0]["mapped-ram"]["header-offset"])


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("truncated-pages", "truncated"),
        ("truncated-header", "truncated"),
        ("layout-version", "layout version 2"),
        ("page-size", "page size differs: 65536"),
    ],
)
def test_bad_snapshot_files_name_the_offset(
    small_snapshot: str, tmp_path: Any, damage: str, words: str
) -> None:
    header = _header_offset(small_snapshot)
    bad = str(tmp_path / "bad.snap")
    if damage == "truncated-pages":
        _corrupt(small_snapshot, bad, cut=4 * MiB)
    elif damage == "truncated-header":
        _corrupt(small_snapshot, bad, cut=header + 10)
    elif damage == "layout-version":
        _corrupt(small_snapshot, bad, patch=(header, struct.pack(">I", 2)))
    else:
        _corrupt(small_snapshot, bad, patch=(header + 4, struct.pack(">Q", 65536)))
    # Both restores check the file with the one reader; one lazy case shows it.
    for lazy in ([], ["--lazy"]) if damage == "layout-version" else ([],):
        code, failed, stderr = trimig("restore", bad, "--ram", "16M", *lazy)
        assert code == 1, (failed, stderr)
        assert failed["status"] == "failed" and words in failed["error-desc"], failed
        offset = failed["error-offset"]
        assert isinstance(offset, int) and f"at offset {offset}" in failed["error-desc"]
        assert "trimig: error:" in stderr and words in stderr, stderr


async def _qmp_save_and_restore(directory: str, lazy: bool) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    guest = guest_command(seed=21 + lazy, rate=1000.0)
    path = os.path.join(directory, "qmp.snap")
    src = _Engine(directory, "src", LAYOUT, guest)
    dst = _Engine(directory, "dst", [*LAYOUT, "--incoming", "defer"], guest)
    clients = []
    try:
        s = await _connect(src, deadline)
        clients.append(s)
        on = [{"capability": "mapped-ram", "state": True}]
        await s.execute("migrate-set-capabilities", {"capabilities": on})
        await asyncio.sleep(0.3)
        file = {"transport": "file", "filename": path, "offset": 0}
        await s.execute("migrate", {"channels": [{"channel-type": "main", "addr": file}]})
        saved = await _until_done(s, deadline)
        assert saved["status"] == "completed", (saved, src.stderr())
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        await s.execute("cont")  # a guest saved to a file still lives here (QEMU's too)
        await asyncio.sleep(0.2)
        source_verify = await s.execute("x-guest-verify")
        d = await _connect(dst, deadline)
        clients.append(d)
        if lazy:
            on.append({"capability": "x-lazy-restore", "state": True})
        await d.execute("migrate-set-capabilities", {"capabilities": on})
        await d.execute("migrate-incoming", {"uri": f"file:{path}"})
        restored = await _until_done(d, deadline)
        await asyncio.sleep(0.3)
        verify = await d.execute("x-guest-verify")
        for client in clients:
            with contextlib.suppress(Exception):
                await client.execute("quit")
        return {
            "source-verify": source_verify,
            "restored": restored,
            "verify": verify,
            "stderr": src.stderr() + dst.stderr(),
        }
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
        for engine in (src, dst):
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.process.wait(15)
            engine.kill()


@pytest.mark.usefixtures("hugepages")
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_qmp_migrate_to_file_and_incoming_from_it(tmp_path: Any, lazy: bool) -> None:
    result = asyncio.run(_qmp_save_and_restore(str(tmp_path), lazy))
    assert result["source-verify"]["verified"] is True, result
    assert result["restored"]["status"] == "completed", result
    assert result["verify"]["verified"] is True, result
    assert "match the journal" in result["verify"]["detail"], result
    if lazy:
        assert result["restored"]["postcopy-requests"] > 0, result
