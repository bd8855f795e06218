"""``trimig demo``'s destination engine is another process: a child ``trimig incoming``
(trimig/demo_process.py). Real processes, found in /proc: the child and its guest exist
while the demo runs and are gone after it; a child killed mid-migration fails the demo,
which names it; a child that never ends is killed past its bound; one that cannot start
says why; a demo stopped by a signal takes them all down, and one killed outright (no
cleanup of its own) leaves nothing behind either: the child stops once its parent is gone.
A ``trimig incoming`` stopped by a signal says so and takes its guest down. The options the
child is given describe the demo's guest and migration."""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme
from precopy_harness import DEADLINE, GUEST_COMMAND, TRIMIG, one_json_object
from tls_certs import write_creds

from trimig._trio import open_nursery
from trimig.cli import build_parser, split_guest_command
from trimig.cli.options import guest_setup, migration_settings, tls_settings
from trimig.demo_process import destination_process, incoming_arguments
from trimig.errors import ConfigError, MigrationFailed
from trimig.migration import MigrationCapabilities, MigrationParameters
from trimig.ram_blocks import RamBlockSpec, default_block_specs

MiB = 1 << 20
#: 64 MiB at 32 MiB/s: seconds of precopy during which the processes can be looked at
#: (the guest dirties far less, so that it converges).
SLOW_DEMO = ("--ram", "64M", "--dirty-rate", "1M", "--max-bandwidth", "32M")
INCOMING = ["-m", "trimig.cli", "incoming"]
GUEST = ["-m", "trimig.guest.workload"]


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                found |= {int(child) for child in listed.read().split()}
    except FileNotFoundError:
        pass
    return found


def descendants(pid: int) -> set[int]:
    found, pending = set(), [pid]
    while pending:
        new = children(pending.pop()) - found
        found |= new
        pending += new
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def runs(pid: int, words: list[str]) -> bool:
    """Whether ``pid`` is python run as ``python WORDS...`` (``-v`` words aside)."""
    arguments = [word for word in command_line(pid).split()[1:] if word != "-v"]
    return arguments[: len(words)] == words


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_all_gone(pids: set[int], *, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {pid: command_line(pid) for pid in pids if alive(pid)}
    assert not left, f"left behind: {left}"


def assert_cancelled_by(signum: signal.Signals, returncode: int | None, out: str, err: str) -> None:
    """A command stopped by ``signum`` said so: exit status, last stderr line, --json."""
    assert returncode == 128 + signum, (out, err)
    message = f"terminated by signal {signum.name}"
    assert err.splitlines()[-1] == f"trimig: error: {message}", err
    assert one_json_object(out) == {"status": "cancelled", "error-desc": message}


def start_incoming(uri: str, *options: str) -> subprocess.Popen[str]:
    """``trimig incoming URI --json OPTIONS`` once it listens (its guest has started)."""
    incoming = subprocess.Popen(
        [*TRIMIG, "incoming", uri, "--json", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + DEADLINE
    while not children(incoming.pid):
        if incoming.poll() is not None or time.monotonic() > deadline:
            incoming.kill()
            pytest.fail(f"trimig incoming never started its guest: {incoming.communicate()}")
        time.sleep(0.05)
    return incoming


def start_demo(*arguments: str, verbose: bool = False) -> subprocess.Popen[str]:
    """``trimig demo --json`` of SLOW_DEMO (warm-up 0.2 s unless ``arguments`` say)."""
    trimig = [*TRIMIG, "-v"] if verbose else TRIMIG
    return subprocess.Popen(
        [*trimig, "demo", "--json", "--warmup", "0.2", *SLOW_DEMO, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def demo_in_precopy(*arguments: str, verbose: bool = False) -> subprocess.Popen[str]:
    """A demo (:func:`start_demo`) whose progress line has said ``active``."""
    demo = start_demo(*arguments, verbose=verbose)
    assert demo.stderr is not None
    deadline = time.monotonic() + DEADLINE
    line = ""
    while not line.startswith("active"):
        ready, _, _ = select.select([demo.stderr], [], [], deadline - time.monotonic())
        line = demo.stderr.readline() if ready else ""
        if not line:
            demo.kill()
            out, err = demo.communicate()
            pytest.fail(f"the demo never said active: {out} {err}")
    return demo


def demo_in_warmup() -> subprocess.Popen[str]:
    """A demo in a long warm-up, its destination listening (its guest started)."""
    demo = start_demo("--warmup", "60")
    deadline = time.monotonic() + DEADLINE
    while not any(runs(pid, INCOMING) and children(pid) for pid in children(demo.pid)):
        if time.monotonic() > deadline or demo.poll() is not None:
            demo.kill()
            pytest.fail(f"the demo's destination never started: {demo.communicate()}")
        time.sleep(0.05)
    return demo


def the_destination(demo: subprocess.Popen[str]) -> int:
    """The demo's child ``trimig incoming``, which has a guest of its own."""
    (destination,) = [pid for pid in children(demo.pid) if runs(pid, INCOMING)]
    assert [runs(pid, GUEST) for pid in children(destination)] == [True]
    return destination


def test_the_destination_is_a_child_trimig_incoming_and_nothing_outlives_the_demo() -> None:
    demo = demo_in_precopy()
    try:
        destination = the_destination(demo)
        tree = descendants(demo.pid)
        sources = [pid for pid in children(demo.pid) if runs(pid, GUEST)]
        assert len(sources) == 1 and destination != demo.pid
        out, err = demo.communicate(timeout=DEADLINE)
    finally:
        demo.kill()
        demo.communicate()
    assert demo.returncode == 0, err
    info = one_json_object(out)
    assert info["verified"] is True, info
    assert info["destination"]["status"] == "completed", info
    assert_all_gone(tree)


def test_with_one_process_both_guests_are_children_of_the_demo() -> None:
    demo = demo_in_precopy("--one-process")
    try:
        assert [runs(pid, GUEST) for pid in children(demo.pid)] == [True, True]
        out, err = demo.communicate(timeout=DEADLINE)
    finally:
        demo.kill()
        demo.communicate()
    assert demo.returncode == 0, err
    assert one_json_object(out)["verified"] is True


def test_a_killed_destination_process_fails_the_demo_which_names_it() -> None:
    """(With -v, which the child is given too: its log is passed on, its error is not.)"""
    demo = demo_in_precopy(verbose=True)
    try:
        destination = the_destination(demo)
        tree = descendants(demo.pid)
        os.kill(destination, signal.SIGKILL)
        out, err = demo.communicate(timeout=DEADLINE)
    finally:
        demo.kill()
        demo.communicate()
    killed = f"the destination process (trimig incoming, pid {destination}) was killed by SIGKILL"
    assert demo.returncode == 1, (out, err)
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("trimig: error: ")]
    assert killed in line, line
    info = one_json_object(out)
    assert info["status"] == "failed" and info["verified"] is False, info
    assert info["destination"] == {"status": "failed", "error-desc": killed}
    assert_all_gone(tree)  # the killed child's guest too


@pytest.mark.parametrize(
    ("signum", "started"),
    [
        (signal.SIGTERM, demo_in_warmup),
        (signal.SIGTERM, demo_in_precopy),
        (signal.SIGINT, demo_in_precopy),
    ],
)
def test_a_demo_stopped_by_a_signal_leaves_nothing_behind(
    signum: signal.Signals, started: Callable[[], subprocess.Popen[str]]
) -> None:
    """In its warm-up (the destination process waits for a source) or in precopy."""
    demo = started()
    try:
        tree = descendants(demo.pid)
        assert any(runs(pid, INCOMING) for pid in tree), tree
        demo.send_signal(signum)
        out, err = demo.communicate(timeout=DEADLINE)
    finally:
        demo.kill()
        demo.communicate()
    assert_cancelled_by(signum, demo.returncode, out, err)
    assert_all_gone(tree)


@pytest.mark.parametrize("started", [demo_in_warmup, demo_in_precopy])
def test_a_demo_killed_outright_leaves_nothing_behind(
    started: Callable[[], subprocess.Popen[str]],
) -> None:
    """SIGKILL runs none of the demo's cleanup: its destination process sees its parent
    exit (--exit-with-parent) and stops, with its guest; the source guest stops too."""
    demo = started()
    try:
        tree = descendants(demo.pid)
        assert any(runs(pid, INCOMING) for pid in tree), tree
        demo.kill()
        demo.communicate(timeout=DEADLINE)
    finally:
        demo.kill()
        demo.communicate()
    assert_all_gone(tree, within=DEADLINE)


def test_trimig_incoming_stopped_by_a_signal_says_so_and_stops_its_guest(
    tmp_path: Path,
) -> None:
    incoming = start_incoming(f"unix:{tmp_path}/sock", "--ram", "16M")
    try:
        tree = descendants(incoming.pid)
        incoming.send_signal(signal.SIGTERM)
        out, err = incoming.communicate(timeout=DEADLINE)
    finally:
        incoming.kill()
        incoming.communicate()
    assert_cancelled_by(signal.SIGTERM, incoming.returncode, out, err)
    assert_all_gone(tree)


def test_trimig_migrate_stopped_by_a_signal_in_precopy_says_so_and_stops_its_guest(
    tmp_path: Path,
) -> None:
    """The destination then fails (its source went away) and exits, guest and all."""
    uri = f"unix:{tmp_path}/sock"
    incoming = start_incoming(uri, *SLOW_DEMO)
    migrate = None
    try:
        migrate = subprocess.Popen(
            [*TRIMIG, "migrate", uri, "--json", "--warmup", "0.2", *SLOW_DEMO],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert migrate.stderr is not None
        line = ""
        while not line.startswith("active"):
            line = migrate.stderr.readline()
            assert line, "trimig migrate never said active"
        tree = descendants(migrate.pid) | descendants(incoming.pid)
        migrate.send_signal(signal.SIGTERM)
        out, err = migrate.communicate(timeout=DEADLINE)
        incoming.communicate(timeout=DEADLINE)
    finally:
        for process in (incoming, migrate):
            if process is not None:
                process.kill()
                process.communicate()
    assert_cancelled_by(signal.SIGTERM, migrate.returncode, out, err)
    assert incoming.returncode == 1
    assert_all_gone(tree)


def test_exit_with_parent_stops_trimig_incoming_when_its_parent_exits(tmp_path: Path) -> None:
    """The parent is a shell that starts ``trimig incoming --exit-with-parent`` in the
    background and exits; the incoming, reparented, stops as on SIGHUP."""
    out = tmp_path / "out.json"
    err = tmp_path / "err.txt"
    incoming_command = [*TRIMIG, "incoming", f"unix:{tmp_path}/sock", "--json", "--ram", "16M"]
    background = ["--exit-with-parent", f">{out}", f"2>{err}", "&", "echo", "$!", ";", "sleep", "3"]
    command = " ".join([*incoming_command, *background])
    shell = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    incoming = int(shell.stdout.split()[0])
    deadline = time.monotonic() + DEADLINE
    while alive(incoming) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(incoming), command_line(incoming)
    message = "the process that started it exited"
    assert err.read_text().splitlines()[-1] == f"trimig: error: {message}"
    assert one_json_object(out.read_text()) == {"status": "cancelled", "error-desc": message}


async def test_a_destination_process_that_never_ends_is_killed_past_its_bound(
    tmp_path: Path,
) -> None:
    """No source ever comes: the child waits for one until its bound, then it and its
    guest are killed, and the result says so."""
    ram = 16 * MiB
    arguments = incoming_arguments(
        default_block_specs(ram),
        GUEST_COMMAND,
        MigrationCapabilities(),
        MigrationParameters(),
        None,
    )
    uri = f"unix:{tmp_path}/sock"
    async with destination_process(
        uri, arguments, run_after=0, ram_bytes=ram, exit_margin=0.75
    ) as destination:
        async with open_nursery() as nursery:
            assert await nursery.start(destination.listen) == uri
            with trio.fail_after(DEADLINE):
                while not children(destination.pid):  # its guest, started once it listens
                    await trio.sleep(0.05)
            tree = descendants(destination.pid) | {destination.pid}
            await destination.settled()
        info, verdict = await destination.result()
    assert verdict is None
    assert info == {
        "status": "failed",
        "error-desc": f"the destination process (trimig incoming, pid {destination.pid}) "
        "did not exit within 1.0 s: killed",
    }
    assert_all_gone(tree)


async def test_a_destination_process_that_cannot_start_says_why(tmp_path: Path) -> None:
    async with destination_process(
        f"unix:{tmp_path}/sock", ["--ram", "bogus"], run_after=0, ram_bytes=0
    ) as destination:
        with pytest.raises(MigrationFailed) as failure:
            async with open_nursery() as nursery:
                await nursery.start(destination.listen)
    assert str(failure.value) == (
        f"the destination process (trimig incoming, pid {destination.pid}) exited with "
        "status 1: bad --ram 'bogus': expected a number with an optional K, M, G or T "
        "(before listening)"
    )


@pytest.mark.parametrize(
    "demo_options",
    [
        ["--ram", "64M", "--huge", "4M", "--dirty-rate", "max", "--seed", "7"],
        ["--postcopy", "--channel-timeout", "5000", "--fill", "zero"],
        ["--postcopy", "--no-preempt", "--tls-creds", "CREDS", "--tls-hostname", "here"],
        ["--ram", "16M", "--", "/bin/true", "guest", "words"],
    ],
)
def test_the_destination_process_is_given_the_demo_guest_and_migration(
    demo_options: list[str], tmp_path: Path
) -> None:
    """The options of the child ``trimig incoming`` make, through the CLI's own parser,
    the demo's RAM layout, guest command, destination capabilities and parameters and
    the destination's TLS settings."""
    creds = write_creds(f"{tmp_path}/creds", trustme.CA())
    words = [creds if word == "CREDS" else word for word in demo_options]
    demo = parse(["demo", *words])
    specs, command = guest_setup(demo)
    capabilities, parameters = migration_settings(demo)
    tls = tls_settings(demo, "server")
    incoming = parse(
        ["incoming", "unix:/x", *incoming_arguments(specs, command, capabilities, parameters, tls)]
    )
    assert guest_setup(incoming) == (specs, command)
    got_capabilities, got_parameters = migration_settings(incoming)
    assert got_capabilities == capabilities
    assert got_parameters.x_channel_timeout == parameters.x_channel_timeout
    assert got_parameters.x_postcopy_auto_recover == 0  # the local source does not recover
    assert tls_settings(incoming, "server") == tls


def parse(argv: list[str]) -> argparse.Namespace:
    own, guest = split_guest_command(argv)
    args = build_parser().parse_args(own)
    args.guest_command = guest
    return args


@pytest.mark.parametrize(
    "specs",
    [[RamBlockSpec("other", 16 * MiB)], [], default_block_specs(16 * MiB) * 2],
)
def test_a_layout_the_options_cannot_express_is_refused(specs: list[RamBlockSpec]) -> None:
    with pytest.raises(ConfigError, match="a destination process takes the built-in RAM layout"):
        incoming_arguments(specs, ["guest"], MigrationCapabilities(), MigrationParameters(), None)
