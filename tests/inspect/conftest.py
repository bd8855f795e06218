"""Fixtures of the ``trimig inspect`` tests: QEMU 7.2's recorded streams (tests/data, see
qemu_recording.py), uncompressed once a module, and the report of the plain one."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest
import qemu_recording

from trimig.inspect.report import StreamReport
from trimig.inspect.walker import inspect_file


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
