"""Postcopy recovery end to end: two ``trimig run`` engines driven over QMP by the
unmodified ``qemu.qmp`` client, a cutting proxy between them (tests/cutting_proxy.py), the
adversarial guest checking every page at the end (tests/recovery_harness.py).

Each run cuts the link after the switch (the proxy goes silent, or resets, or
``migrate-pause`` on one side), checks that both sides report ``postcopy-paused`` within
the bound of x-channel-timeout, recovers with QEMU's sequence (``migrate-recover`` on the
destination, ``migrate`` with ``resume: true`` on the source), and does it again; one
recovery attempt goes to an address where nothing listens first and must leave the
migration paused and retryable. The 100-run campaign with random cut points is
``python tests/recovery_campaign.py`` (docs/correctness.md).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from adversarial_harness import TRIMIG, _json, _read_listening, guest_command
from cutting_proxy import cutting_proxy
from recovery_harness import PAUSE_BOUND, RecoveryPlan, migrate_with_cuts

PLANS = {
    # Main channel only, tcp: a black hole (detected by x-channel-timeout on both sides),
    # then a failed attempt, then a reset.
    "tcp-main-hole-reset": RecoveryPlan(
        seed=11,
        preempt=False,
        transport="tcp",
        cuts=((0.3, "hole"), (0.2, "reset")),
        failed_attempt=True,
    ),
    # Preempt, unix: migrate-pause on each side, then a black hole.
    "unix-preempt-pauses-hole": RecoveryPlan(
        seed=12,
        preempt=True,
        transport="unix",
        huge="4M",
        cuts=((0.2, "pause-source"), (0.2, "pause-destination"), (0.2, "hole")),
    ),
    # One channel at a time (tests/cutting_proxy.py): the main connection goes silent,
    # then the preempt one is reset (the source notices at once: watch_urgent).
    "unix-preempt-channels": RecoveryPlan(
        seed=16, preempt=True, transport="unix", cuts=((0.3, "hole main"), (0.2, "reset preempt"))
    ),
    # TLS on every channel (tls-creds-x509 on both engines): the preempt connection is
    # reset, the main one goes silent, migrate-pause on the source (a TLS stream's
    # shutdown), each recovered over new TLS connections.
    "tcp-tls-channels": RecoveryPlan(
        seed=17,
        preempt=True,
        transport="tcp",
        tls=True,
        cuts=((0.3, "reset preempt"), (0.2, "hole main"), (0.2, "pause-source")),
    ),
    # x-postcopy-auto-recover: no recovery command at all; the network goes silent for a
    # while, then resets, and the engines re-establish the channels themselves.
    "tcp-preempt-auto": RecoveryPlan(
        seed=13, preempt=True, transport="tcp", cuts=((0.3, "hole"), (0.2, "reset")), auto=True
    ),
    # The CLI: trimig pause, trimig recover on the destination, trimig migrate --qmp --resume on the
    # source, trimig info verify at the end.
    "tcp-cli": RecoveryPlan(
        seed=14, preempt=False, transport="tcp", cuts=((0.3, "pause-destination"),), via_cli=True
    ),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_postcopy_survives_cuts_through_qmp(name: str, request: pytest.FixtureRequest) -> None:
    plan = PLANS[name]
    if plan.huge != "0":
        request.getfixturevalue("hugepages")  # both engines' 4 MiB hugetlb blocks
    result = migrate_with_cuts(plan)
    assert result.ok, result.describe()
    # Every cut landed in postcopy and was recovered from (the runs are slow enough).
    assert result.recoveries == len(plan.cuts), result.describe()
    assert len(result.pauses) == len(plan.cuts)
    assert all(pause < PAUSE_BOUND for pause in result.pauses), result.pauses
    assert result.failed_attempts == int(plan.failed_attempt)
    assert result.verify["detail"].startswith("all "), result.verify


def test_cli_postcopy_recovers_by_itself() -> None:
    """``trimig incoming --postcopy`` and ``trimig migrate --postcopy`` (automatic recovery
    on by default) through the proxy: it resets after the switch and then goes silent for
    a while; nobody runs a recovery command, both processes end with the guest verified."""
    options = ["--ram", "256M", "--postcopy", "--channel-timeout", "2000"]
    guest = [*guest_command(15, 2000.0), "--lazy"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + 150
    destination = subprocess.Popen(
        [*TRIMIG, "incoming", "tcp:127.0.0.1:0", "--json", *options, "--", *guest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    source: subprocess.Popen[str] | None = None
    try:
        address = _read_listening(destination, deadline)
        with cutting_proxy("tcp:127.0.0.1:0", address) as proxy:
            flags = [*options, "--", *guest]
            source = subprocess.Popen(
                [*TRIMIG, "migrate", proxy.uri, "--json", "--max-bandwidth", "64M", *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert source.stdout is not None and source.stderr is not None
            stderr = source.stderr
            # Cut once the source's progress says the guest runs there (postcopy-active).
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")))
            reader.start()
            while not any(line.startswith("postcopy-active") for line in lines):
                assert source.poll() is None and time.monotonic() < deadline, lines
                time.sleep(0.02)
            time.sleep(0.3)
            proxy.send("reset")
            time.sleep(0.5)
            proxy.send("up")
            time.sleep(1.0)
            proxy.send("hole")
            time.sleep(4.0)  # past x-channel-timeout: both sides pause
            proxy.send("up")
            source.wait(timeout=max(1.0, deadline - time.monotonic()))
            reader.join(10)
            out, err = source.stdout.read(), "".join(lines)
            dest_out, dest_err = destination.communicate(
                timeout=max(1.0, deadline - time.monotonic())
            )
        sent, received = _json(out), _json(dest_out)
        report = f"source: {err[-3000:]}\ndestination: {dest_err[-3000:]}"
        assert source.returncode == 0 and destination.returncode == 0, report
        assert sent["status"] == "completed" and received["status"] == "completed", report
        assert received["verified"], received
        assert sent.get("x-postcopy-recoveries", 0) >= 1, report
        assert received.get("x-postcopy-recoveries", 0) >= 1, report
    finally:
        for process in (source, destination):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
