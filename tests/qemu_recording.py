"""The QEMU streams recorded for the tests of tests/inspect/: the guest's known contents and how
the streams were recorded (``python tests/qemu_recording.py`` records them again).

The guest is ``qemu-system-x86_64 -M pc -accel tcg -m 4 -nodefaults -vga none -nographic -S``:
stopped before its first instruction (``-S``), so its RAM holds exactly what QEMU put
there at reset. Two ``-device loader`` devices give it known contents: a raw file of
IMAGE_PAGES pages (see :func:`image`) at IMAGE_ADDRESS and the 8-byte value DATA_VALUE at
DATA_ADDRESS (little-endian, as x86 stores it). Below 4 GiB a ``pc`` guest's physical
addresses are offsets in its ``pc.ram`` block, and nothing else writes to ``pc.ram``
without the guest running, so ``pc.ram`` is :func:`expected_pc_ram`. QMP (``qemu.qmp``)
then migrates it with ``migrate exec:cat > FILE``, once plainly and once with the
``x-ignore-shared`` capability (which adds the ``configuration/capabilities``
subsection and each block's guest address to the MEM_SIZE list), and the files are
compressed with xz (``lzma``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
QEMU = "qemu-system-x86_64"
#: The recorded streams: file name -> migration capabilities turned on.
RECORDINGS = {
    "qemu-7.2-pc.mig.xz": (),
    "qemu-7.2-pc-ignore-shared.mig.xz": ("x-ignore-shared",),
}

PAGE = 4096
RAM_SIZE = 4 << 20
IMAGE_ADDRESS = 0x100000
IMAGE_PAGES = 512
DATA_ADDRESS = 0x80000
DATA_VALUE = 0x0123456789ABCDEF


def image_page(index: int) -> bytes:
    """Page ``index`` of the loaded image: every 16th page from 5 on is zero, every 16th
    from 9 on pseudo-random (SHA-256 in counter mode), the others a text naming the page."""
    if index % 16 == 5:
        return bytes(PAGE)
    if index % 16 == 9:
        return b"".join(
            hashlib.sha256(f"trimig inspect {index} {n}".encode()).digest()
            for n in range(PAGE // 32)
        )
    line = f"trimig inspect test image, page {index:3d} of {IMAGE_PAGES}\n".encode()
    return (line * (PAGE // len(line) + 1))[:PAGE]


def image() -> bytes:
    """The file loaded at IMAGE_ADDRESS."""
    return b"".join(image_page(index) for index in range(IMAGE_PAGES))


def expected_pc_ram() -> bytes:
    """What the recorded guest's ``pc.ram`` holds."""
    ram = bytearray(RAM_SIZE)
    data = image()
    ram[IMAGE_ADDRESS : IMAGE_ADDRESS + len(data)] = data
    ram[DATA_ADDRESS : DATA_ADDRESS + 8] = DATA_VALUE.to_bytes(8, "little")
    return bytes(ram)


def qemu_command(image_path: str, qmp_path: str) -> list[str]:
    return [
        QEMU,
        "-M", "pc",
        "-accel", "tcg",
        "-m", str(RAM_SIZE >> 20),
        "-nodefaults",
        "-vga", "none",
        "-nographic",
        "-S",
        "-device", f"loader,file={image_path},addr={IMAGE_ADDRESS:#x},force-raw=on",
        "-device", f"loader,addr={DATA_ADDRESS:#x},data={DATA_VALUE:#x},data-len=8",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip


async def _migrate(qmp_path: str, output: str, capabilities: tuple[str, ...]) -> None:
    from qemu.qmp import QMPClient

    client = QMPClient("trimig-recording")
    await client.connect(qmp_path)
    try:
        if capabilities:
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": name, "state": True} for name in capabilities]},
            )
        await client.execute("migrate", {"uri": f"exec:cat > {output}"})
        deadline = time.monotonic() + 30
        while True:
            info = await client.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") == "completed":
                break
            if info.get("status") == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's migration did not complete: {info}")
            await asyncio.sleep(0.05)
        await client.execute("quit")
    finally:
        with contextlib.suppress(Exception):  # QEMU closed the socket as it quit
            await client.disconnect()


def record(output: Path, capabilities: tuple[str, ...] = ()) -> None:
    """Run the guest, migrate it to ``output`` (uncompressed) and quit QEMU."""
    with tempfile.TemporaryDirectory(prefix="trimig-qemu-") as directory:
        image_path = os.path.join(directory, "image.bin")
        qmp_path = os.path.join(directory, "qmp.sock")
        Path(image_path).write_bytes(image())
        qemu = subprocess.Popen(
            qemu_command(image_path, qmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(qmp_path):
                if qemu.poll() is not None or time.monotonic() > deadline:
                    assert qemu.stderr is not None
                    raise RuntimeError(f"QEMU did not start: {qemu.stderr.read().decode()}")
                time.sleep(0.02)
            asyncio.run(_migrate(qmp_path, str(output), capabilities))
            qemu.wait(timeout=30)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
            if qemu.stderr is not None:
                qemu.stderr.close()


def qemu_version() -> str:
    result = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0]


def main() -> int:
    if shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed", file=sys.stderr)
        return 1
    print(qemu_version())
    for name, capabilities in RECORDINGS.items():
        target = DATA_DIR / name
        with tempfile.TemporaryDirectory(prefix="trimig-qemu-") as directory:
            raw = Path(directory) / "stream.mig"
            record(raw, capabilities)
            data = raw.read_bytes()
        target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        print(f"{target}: {len(data)} bytes, {target.stat().st_size} compressed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
