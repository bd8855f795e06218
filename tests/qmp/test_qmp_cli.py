"""The control CLI against a QMP server running in its own thread (fake engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from qmp_helpers import FakeEngine, ThreadedServer

from trimig.cli.control import parse_command_arguments, run_control_command
from trimig.cli.output import format_migrate_info, progress_line
from trimig.errors import ConfigError


def engine_of(server: ThreadedServer) -> FakeEngine:
    assert server.engine is not None
    return server.engine


def test_parse_command_arguments() -> None:
    assert parse_command_arguments("migrate", ["uri=tcp:127.0.0.1:4444"]) == {
        "uri": "tcp:127.0.0.1:4444"
    }
    # Schema strings stay text even when they look like JSON.
    assert parse_command_arguments("migrate", ["uri=123"]) == {"uri": "123"}
    assert parse_command_arguments(
        "migrate-set-parameters", ["downtime-limit=300", "x=abc", "flag=true"]
    ) == {"downtime-limit": 300, "x": "abc", "flag": True}
    assert parse_command_arguments(
        "migrate-set-capabilities", ['{"capabilities": [{"capability": "events", "state": true}]}']
    ) == {"capabilities": [{"capability": "events", "state": True}]}
    for bad in (["novalue"], ["=x"], ["a=1", "a=2"], ["{bad json"]):
        with pytest.raises(ConfigError):
            parse_command_arguments("migrate", bad)


def test_ctl_runs_any_command(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = threaded_server.path
    assert run_control_command(["ctl", path, "migrate-set-parameters", "downtime-limit=42"]) == 0
    assert capsys.readouterr().out == ""
    assert run_control_command(["ctl", path, "query-migrate-parameters", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["downtime-limit"] == 42
    caps = '{"capabilities": [{"capability": "events", "state": true}]}'
    assert run_control_command(["ctl", path, "migrate-set-capabilities", caps]) == 0
    assert engine_of(threaded_server).capabilities["events"] is True
    assert run_control_command(["ctl", path, "query-status"]) == 0
    assert json.loads(capsys.readouterr().out) == {"running": True, "status": "running"}


def test_errors_are_reported_with_exit_status_1(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    path = threaded_server.path
    assert run_control_command(["ctl", path, "bogus"]) == 1
    assert "The command bogus has not been found" in capsys.readouterr().err
    assert run_control_command(["ctl", path, "migrate-set-parameters", "downtime-limit=x"]) == 1
    assert "parameter 'downtime-limit' must be an integer" in capsys.readouterr().err
    assert run_control_command(["start-postcopy", path]) == 1
    assert "postcopy can only start" in capsys.readouterr().err
    missing = os.path.join(os.path.dirname(path), "nobody-here")
    assert run_control_command(["info", "migrate", missing]) == 1
    assert "cannot connect to QMP socket" in capsys.readouterr().err


def test_migrate_cancel_and_info(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = threaded_server.path
    assert run_control_command(["info", "migrate", path]) == 0
    assert capsys.readouterr().out.strip() == "no migration has run"
    assert run_control_command(["migrate", path, "tcp:10.1.1.1:4444"]) == 0
    assert "tcp:10.1.1.1:4444" in capsys.readouterr().out
    assert ("migrate", "tcp:10.1.1.1:4444") in engine_of(threaded_server).calls
    assert run_control_command(["info", "migrate", path]) == 0
    table = capsys.readouterr().out
    assert (
        "status" in table and "active" in table and "3.0 MiB" in table and "812.5 Mbit/s" in table
    )
    assert run_control_command(["info", "migrate", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ram"]["total"] == 4 << 20
    assert run_control_command(["info", "capabilities", path]) == 0
    assert "postcopy-ram" in capsys.readouterr().out
    assert run_control_command(["cancel", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {}
    assert engine_of(threaded_server).status == "cancelled"


def test_format_helpers() -> None:
    info = FakeEngine()
    info.status = "active"
    line = progress_line(info.query_migrate(), passes=5)
    assert line.startswith("active") and "pass 5" in line and "75.0%" in line
    assert "1.2 s" in line
    table = format_migrate_info(info.query_migrate())
    assert "dirty syncs (passes)" in table


def _drive_migration(server: ThreadedServer, final: str) -> threading.Thread:
    engine = engine_of(server)

    def drive() -> None:
        time.sleep(0.2)
        server.call(engine.set_capabilities, {"events": True})
        server.call(engine._set_status, "active")
        for n in (1, 2, 3):
            time.sleep(0.05)
            server.call(engine.emit, "MIGRATION_PASS", {"pass": n})
        time.sleep(0.05)
        server.call(engine._set_status, final)

    thread = threading.Thread(target=drive)
    thread.start()
    return thread


@pytest.mark.parametrize(("final", "status"), [("completed", 0), ("failed", 1), ("cancelled", 1)])
def test_watch_follows_until_the_end(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str], final: str, status: int
) -> None:
    driver = _drive_migration(threaded_server, final)
    try:
        assert run_control_command(["watch", threaded_server.path, "--interval", "0.05"]) == status
    finally:
        driver.join()
    err = capsys.readouterr().err
    assert "active" in err and "pass 3" in err
    lines = err.rstrip().splitlines()
    if status:  # a failed or cancelled end is named on a line of its own, last
        assert lines.pop() == f"trimig: error: migration {final}", err
    assert lines[-1].startswith(final)


def test_watch_json_lines(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = _drive_migration(threaded_server, "completed")
    try:
        assert (
            run_control_command(["watch", threaded_server.path, "--json", "--interval", "0.05"])
            == 0
        )
    finally:
        driver.join()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    events = [line for line in lines if "event" in line]
    assert [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"] == [1, 2, 3]
    assert {k: events[-1][k] for k in ("event", "data")} == {
        "event": "MIGRATION",
        "data": {"status": "completed"},
    }
    assert lines[-1]["query-migrate"]["status"] == "completed"


def test_module_entry_point_in_a_separate_process(threaded_server: ThreadedServer) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trimig.cli.control",
            "info",
            "status",
            threaded_server.path,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"running": True, "status": "running"}


def test_wired_into_the_main_cli(
    threaded_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from trimig.cli import main

    path = threaded_server.path
    assert main(["info", "status", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"running": True, "status": "running"}
    assert main(["ctl", path, "stop"]) == 0
    assert engine_of(threaded_server).running is False
    # The main CLI owns `migrate`; with --qmp it forwards to the control command.
    assert main(["migrate", "--qmp", path, "unix:/tmp/somewhere", "--json"]) == 0
    assert ("migrate", "unix:/tmp/somewhere") in engine_of(threaded_server).calls
