"""Every failing ``trimig`` command names its failure in one line on stderr (no
traceback), carries it in its ``--json`` output on stdout, and exits non-zero.

Real processes: ``trimig incoming`` refusing a stream, ``trimig migrate`` refused,
``trimig demo`` whose destination refuses, commands that fail before any migration
(a bad URI, an address that cannot be listened on), and ``trimig run`` that cannot
serve. The QMP control commands are checked against real engines in
tests/qmp/test_engines_failures.py.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from precopy_harness import DEADLINE, DIRTY_RATE, TRIMIG, one_json_object, run_trimig
from refusing_guest import REFUSAL

GUEST_OPTIONS = ("--dirty-rate", DIRTY_RATE)
REFUSING_GUEST = [sys.executable, str(Path(__file__).with_name("refusing_guest.py"))]
SIZES = "RAM block 'pc.ram' has 67108864 bytes in the stream but 33554432 here"


def error_lines(stderr: str) -> list[str]:
    """The ``trimig: error:`` lines of a command's stderr; no traceback allowed."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("trimig: error: ")]


def table(stdout: str) -> dict[str, str]:
    """The statistics table a command printed: {row name: value}."""
    rows = {}
    for line in stdout.splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_incoming_that_refuses_a_stream_and_the_refused_migrate(as_json: bool) -> None:
    """The destination has half the source's RAM: both sides fail, and say why."""
    json_flag = ["--json"] if as_json else []
    with tempfile.TemporaryDirectory(prefix="tcf", dir="/tmp") as directory:
        uri = f"unix:{directory}/sock"
        incoming = subprocess.Popen(
            [*TRIMIG, "incoming", uri, "--ram", "32M", *json_flag, *GUEST_OPTIONS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert incoming.stderr is not None
            ready, _, _ = select.select([incoming.stderr], [], [], DEADLINE)
            assert ready, "trimig incoming said nothing"
            assert incoming.stderr.readline().startswith("trimig: listening on ")
            migrate = run_trimig("migrate", uri, "--ram", "64M", "--warmup", "0.1", *json_flag)
            out, err = incoming.communicate(timeout=DEADLINE)
        finally:
            if incoming.poll() is None:
                incoming.kill()
            incoming.communicate()
    assert incoming.returncode == 1
    (line,) = error_lines(err)
    assert line == f"trimig: error: incoming migration failed: {SIZES}", err
    destination = one_json_object(out) if as_json else table(out)
    assert destination["status"] == "failed"
    assert destination["error-desc"] == SIZES
    assert migrate.returncode == 1
    (line,) = error_lines(migrate.stderr)
    assert line.startswith(f"trimig: error: migration to {uri} failed: "), migrate.stderr
    assert "SHUT status 1" in line, line  # the destination's verdict, from the return path
    source = one_json_object(migrate.stdout) if as_json else table(migrate.stdout)
    assert source["status"] == "failed"
    assert source["error-desc"] in line


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_demo_whose_destination_refuses(as_json: bool) -> None:
    json_flag = ["--json"] if as_json else []
    result = run_trimig(
        "demo", "--ram", "32M", "--warmup", "0.1", *json_flag, *GUEST_OPTIONS,
        "--", *REFUSING_GUEST,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    (line,) = error_lines(result.stderr)
    assert "SHUT status 1" in line and REFUSAL in line, line
    if as_json:
        info = one_json_object(result.stdout)
        assert info["status"] == "failed"
        assert "SHUT status 1" in info["error-desc"]
        assert info["destination"]["status"] == "failed"
        assert REFUSAL in info["destination"]["error-desc"]
        assert info["verified"] is False
    else:
        rows = table(result.stdout)
        assert rows["status"] == "failed" and "SHUT status 1" in rows["error-desc"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["migrate", "bogus:somewhere"], "unknown transport 'bogus'"),
        (["incoming", "bogus:somewhere"], "unknown transport 'bogus'"),
        (["demo", "--", "/bin/false"], "(/bin/false) exited with status 1 during hello"),
        # An address that is not ours: the listen fails (one line, not error + cause).
        (["incoming", "tcp:192.0.2.1:4444"], "Cannot assign requested address"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_failure_before_any_migration(arguments: list[str], expected: str, as_json: bool) -> None:
    json_flag = ["--json"] if as_json else []
    result = run_trimig(arguments[0], "--ram", "16M", *json_flag, *arguments[1:])
    assert result.returncode == 1, (result.stdout, result.stderr)
    (line,) = error_lines(result.stderr)
    assert expected in line, line
    assert len([line for line in result.stderr.splitlines() if line.startswith("trimig:")]) == 1
    if as_json:
        info = one_json_object(result.stdout)
        assert info["status"] == "failed"
        assert expected in info["error-desc"] and info["error-desc"] in line
    else:
        assert result.stdout == ""


def test_run_that_cannot_serve_says_why_in_one_line() -> None:
    result = run_trimig("run", "--qmp", "unix:/nonexistent/dir/qmp.sock", "--ram", "16M")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "trimig: error: cannot listen on QMP socket /nonexistent/dir/qmp.sock: "
        "No such file or directory"
    ], result.stderr
