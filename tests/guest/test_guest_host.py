"""GuestProcess against misbehaving guests: deaths, silence, bad hellos, leaks."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from trimig.errors import GuestError
from trimig.guest.host import GuestProcess, workload_command
from trimig.ram_blocks import RamBlockSpec

FAKE_GUEST = Path(__file__).with_name("fake_guest.py")


def fake(mode: str) -> list[str]:
    return [sys.executable, str(FAKE_GUEST), mode]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def test_minimal_foreign_guest(start_guest):
    """A guest written without trimig's library, from the protocol document alone."""
    guest = await start_guest(fake("minimal"))
    await guest.ping()
    await guest.cont()
    assert (await guest.query())["running"] is True
    with pytest.raises(GuestError, match="failed verify: verify: not supported"):
        await guest.verify()
    # A guest written before stop's save-state field ignores it: no state in the reply.
    assert await guest.stop_and_save() is None
    assert (await guest.query())["running"] is False
    assert await guest.quit() == 0


async def test_guest_dying_mid_command_reports_status_and_output(start_guest):
    guest = await start_guest(fake("exit-on-request"))
    with pytest.raises(GuestError) as caught:
        await guest.stop()
    message = str(caught.value)
    assert "exited with status 3 during stop" in message
    assert "dying on purpose at stop" in message
    with pytest.raises(GuestError, match="after the guest was closed"):
        await guest.cont()


async def test_killed_workload_reports_the_signal(start_guest, make_blocks):
    guest = await start_guest()
    await guest.attach(make_blocks([RamBlockSpec("ram", 1 << 20)]), "new")
    await guest.cont()
    os.kill(guest.pid, signal.SIGKILL)
    with pytest.raises(GuestError, match="killed by SIGKILL during stop"):
        await guest.stop()


async def test_silent_guest_times_out_naming_the_command(start_guest):
    guest = await start_guest(fake("silent"), reply_timeout=0.3)
    with pytest.raises(GuestError, match=r"did not answer save-state within 0\.3 s"):
        await guest.save_state()
    started = time.monotonic()
    await guest.aclose()  # it missed a deadline: no quit, SIGTERM at once
    assert time.monotonic() - started < 1.5
    assert guest.returncode == -signal.SIGTERM


async def test_late_reply_to_an_abandoned_request_is_skipped(start_guest):
    guest = await start_guest(fake("slow"))
    with pytest.raises(GuestError, match="did not answer stop"):
        await guest.stop(timeout=0.1)
    status = await guest.query(timeout=2)
    assert status["blocks"] == [], "the late reply to stop was taken for query's"
    assert status["running"] is False
    await guest.cont(timeout=2)
    assert (await guest.query(timeout=2))["running"] is True


async def test_load_state_deadline_follows_progress(start_guest):
    """A load-state given ``progress`` (a postcopy destination's pages placed) may take
    longer than its deadline while the count grows: it waits for the memory it reads,
    it is not wedged. Without growth the deadline holds, counted from the last growth."""
    # Answers after 2 s (load-state: "not supported"): four times the deadline, so the
    # margins hold on a loaded machine (the progress poll may run late).
    guest = await start_guest(fake("slower"))
    placed = 0

    def growing() -> int:
        nonlocal placed
        placed += 1
        return placed

    with pytest.raises(GuestError, match="failed load-state: load-state: not supported"):
        await guest.load_state(b"state", timeout=0.5, progress=growing)
    with pytest.raises(
        GuestError, match=r"did not answer load-state within 0\.5 s of the last progress"
    ):
        await guest.load_state(b"state", timeout=0.5, progress=lambda: 7)


async def test_aclose_terminates_a_wedged_guest(start_guest):
    guest = await start_guest(fake("wedged"))
    started = time.monotonic()
    await guest.aclose()  # no answer to quit, socket close unnoticed: SIGTERM ends it
    assert time.monotonic() - started < 8
    assert guest.returncode == -signal.SIGTERM


@pytest.mark.parametrize(
    ("mode", "error", "start_timeout"),
    [
        # These fail as soon as the guest has started: the bound only has to outlast a
        # Python start-up on a loaded machine.
        ("exit-before-hello", r"(?s)exited with status 7 during hello.*cannot start", 20.0),
        ("bad-hello", "instead of a hello for protocol version 1", 20.0),
        ("no-hello", "said no hello within 0.5 s", 0.5),
    ],
)
async def test_bad_start(mode, error, start_timeout):
    before = open_fds()
    with pytest.raises(GuestError, match=error):
        await GuestProcess.start(fake(mode), start_timeout=start_timeout)
    assert open_fds() == before


async def test_command_that_cannot_run():
    with pytest.raises(GuestError, match="cannot start guest"):
        await GuestProcess.start(["/nonexistent/guest"])


async def test_no_leaked_fds_or_processes(make_blocks):
    blocks = make_blocks([RamBlockSpec("ram", 1 << 20)])
    before = open_fds()
    async with GuestProcess.open(workload_command()) as guest:
        await guest.attach(blocks, "new")
        uffd, _ = await guest.track_dirty()
        uffd.close()
        await guest.cont()
        await trio.sleep(0.05)
        await guest.stop()
        await guest.verify()
        pid = guest.pid
    assert guest.returncode == 0
    assert_reaped(pid)
    assert open_fds() == before


async def test_aclose_when_cancelled_still_reaps(make_blocks):
    before = open_fds()
    with trio.CancelScope() as scope:
        async with GuestProcess.open(fake("minimal")) as guest:
            scope.cancel()  # cancelled once it runs, however long its start took
            await trio.sleep_forever()
    assert guest.returncode is not None
    assert open_fds() == before
