"""The command line, run as real processes: ``trimig demo --json`` over every transport,
and ``trimig incoming`` + ``trimig migrate`` as two processes over tcp."""

from __future__ import annotations

import select
import subprocess
import time

import pytest
from precopy_harness import (
    DEADLINE,
    DIRTY_RATE,
    GUEST_RAM,
    TRIMIG,
    assert_query_migrate_names,
    one_json_object,
    run_trimig,
)

from trimig.migration import TRANSPORT_NAMES

GUEST_OPTIONS = ("--ram", "64M", "--dirty-rate", DIRTY_RATE)


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
def test_demo_json(transport: str) -> None:
    result = run_trimig(
        "demo", "--json", "--transport", transport, "--warmup", "0.2", *GUEST_OPTIONS
    )
    assert result.returncode == 0, result.stderr
    info = one_json_object(result.stdout)
    assert info["verified"] is True, info
    assert_query_migrate_names(info)
    assert info["ram"]["total"] == GUEST_RAM
    assert info["destination"]["status"] == "completed"
    assert info["verdict"]["page_count"] == GUEST_RAM // 4096


def test_incoming_and_migrate_processes_over_tcp() -> None:
    """Two real processes; the destination listens on port 0 and says which port it got.
    (Options go after the URI, as people write them.)"""
    incoming = subprocess.Popen(
        [*TRIMIG, "incoming", "tcp:127.0.0.1:0", "--json", *GUEST_OPTIONS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert incoming.stderr is not None
        ready, _, _ = select.select([incoming.stderr], [], [], DEADLINE)
        assert ready, "trimig incoming said nothing"
        line = incoming.stderr.readline().strip()
        assert line.startswith("trimig: listening on tcp:127.0.0.1:"), line
        uri = line.rpartition(" ")[2]
        assert int(uri.rpartition(":")[2]) > 0
        migrate = run_trimig("migrate", uri, "--json", "--warmup", "0.2", *GUEST_OPTIONS)
        out, err = incoming.communicate(timeout=DEADLINE)
    finally:
        if incoming.poll() is None:
            incoming.kill()
        incoming.communicate()
    assert migrate.returncode == 0, migrate.stderr
    assert incoming.returncode == 0, err
    source = one_json_object(migrate.stdout)
    assert_query_migrate_names(source)
    destination = one_json_object(out)
    assert destination["status"] == "completed"
    assert destination["verified"] is True, destination
    assert destination["socket-address"] == [uri]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("bogus:somewhere", "unknown transport 'bogus'"),
        ("tcp:127.0.0.1", "missing port"),
        ("rdma:10.0.0.1:4444", "InfiniBand"),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "incoming"])
def test_bad_uri_exits_1_naming_it(command: str, uri: str, expected: str) -> None:
    started = time.monotonic()
    result = run_trimig(command, uri, "--ram", "64M")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    error = result.stderr.splitlines()[-1]  # after the progress lines of migrate
    assert error.startswith("trimig: error: "), result.stderr
    assert uri in error and expected in error
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < DEADLINE


@pytest.mark.parametrize("command", ["demo", "migrate", "incoming"])
def test_a_dirty_rate_of_zero_is_refused_not_read_as_max(command: str) -> None:
    """The workload's own 0 means no limit; on the command line it would surprise."""
    uri = [] if command == "demo" else ["unix:/nonexistent/sock"]
    result = run_trimig(command, *uri, "--json", "--ram", "16M", "--dirty-rate", "0")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("trimig: error: --dirty-rate '0': "), error
    assert "'max'" in error
    assert one_json_object(result.stdout)["error-desc"] == error.removeprefix("trimig: error: ")
