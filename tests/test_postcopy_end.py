"""The end of postcopy, and a device load that reads all of RAM.

The end (docs/postcopy.md, "The end") must be an orderly close of every channel, never a
race between a page request still in flight and the closing of the urgent channel: the
source ends the urgent channel once no page is dirty (a request read later is answered
with nothing: its page is on the main channel) and then the main one; the destination
reads both to their ends before it stops asking for pages and sends SHUT. Before, the
destination closed the urgent channel as soon as the main stream ended, and a source
still answering its last requests broke there ("writing the urgent page channel failed:
Broken pipe", both sides paused, the guest lost).

Real guests, the real kernel and real sockets; over tcp and unix both sides run the
OS-thread variants of their postcopy loops, as real runs do (postcopy_harness.py).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from postcopy_harness import (
    Pair,
    assert_completed_and_verified,
    busy_cores,
    postcopy_settings,
    run_pair,
)

from trimig.guest.workload import workload_arguments
from trimig.kernel import HUGE_PAGE_SIZE
from trimig.postcopy import PageRequest
from trimig.ram_blocks import default_block_specs
from trimig.savevm.postcopy import RequestServed, UrgentSender

GUESTS = os.path.join(os.path.dirname(__file__), "postcopy_guests.py")
#: The workload at its maximal dirty rate, reading pages at random all along: on the
#: destination it faults up to the last pages still in flight.
RANDOM_READER = [sys.executable, GUESTS, "reads-at-random", *workload_arguments(dirty_rate="max")]
#: Enough RAM that the socket buffers (megabytes) still hold pages when the source has
#: sent the last one, so the guest there faults at the very end.
RAM = 16 << 20
#: How late the source answers a request once it has sent every page.
LATE_ANSWER = 0.03


def assert_every_request_counted(pair: Pair) -> None:
    """The source read every request the destination sent (random fill: no zero holes
    placed locally), before the SHUT that follows them."""
    sent = pair.incoming.query()["postcopy-requests"]
    assert pair.outgoing.query()["ram"]["postcopy-requests"] == sent


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_requests_answered_late_at_the_end(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that answers late once it has sent every page (as one whose return-path
    thread lost its CPU to another process): the destination reads the main stream's end
    while its last requests are still unanswered. Before, it closed the urgent channel
    under the late answer: Broken pipe on the source, both sides paused."""
    late: list[PageRequest] = []
    answer = UrgentSender.send_from_thread

    def answer_late(self: UrgentSender, request: PageRequest) -> RequestServed:
        if self.ram.dirty_pages == 0:
            late.append(request)
            time.sleep(LATE_ANSWER)
        return answer(self, request)

    monkeypatch.setattr(UrgentSender, "send_from_thread", answer_late)
    capabilities, parameters = postcopy_settings(preempt=True)
    pair = await run_pair(
        default_block_specs(RAM),
        transport=transport,
        capabilities=capabilities,
        parameters=parameters,
        source_command=RANDOM_READER,
    )
    assert_completed_and_verified(pair)
    assert late, "no request came after the last page: this checked nothing"
    assert_every_request_counted(pair)


def _contended_cells() -> list[object]:
    cells: list[object] = []
    for transport in ("tcp", "unix"):
        for preempt in (True, False):
            for huge in (False, True):
                cell = (transport, preempt, huge)
                quick = cell in (("tcp", True, False), ("unix", True, True))
                marks = () if quick else (pytest.mark.slow,)
                name = f"{transport}-{'preempt' if preempt else 'main-only'}"
                cells.append(pytest.param(*cell, marks=marks, id=name + ("-huge" if huge else "")))
    return cells


#: Migrations in a row per cell, under contention.
CONTENDED_RUNS = 3


@pytest.mark.parametrize(("transport", "preempt", "huge"), _contended_cells())
async def test_postcopy_under_cpu_contention_always_completes(
    transport: str, preempt: bool, huge: bool, request: pytest.FixtureRequest
) -> None:
    """Several postcopy migrations in a row while a busy process competes for each core:
    each one completes on both sides, every request is counted, and the guest verifies."""
    if huge:
        request.getfixturevalue("hugepages")
    specs = default_block_specs(RAM, huge=2 * HUGE_PAGE_SIZE if huge else 0)
    capabilities, parameters = postcopy_settings(preempt=preempt)
    with busy_cores():
        for run in range(CONTENDED_RUNS):
            pair = await run_pair(
                specs,
                transport=transport,
                capabilities=capabilities,
                parameters=parameters,
                source_command=RANDOM_READER,
            )
            try:
                assert_completed_and_verified(pair)
                if not huge:
                    assert_every_request_counted(pair)
            except AssertionError as error:
                raise AssertionError(f"run {run + 1} of {CONTENDED_RUNS}: {error}") from error


# -- a device load that reads all of RAM ------------------------------------------------

LOAD_READS_ALL = [sys.executable, GUESTS, "load-reads-all", *workload_arguments(dirty_rate="max")]
LOAD_RAM = 32 << 20


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
async def test_device_load_that_reads_all_of_ram_gets_the_background_stream(
    preempt: bool,
) -> None:
    """The guest checks its whole RAM at load-state, before it runs there. The source holds
    its background stream until the guest runs (PONG 4), but a page request before
    PONG(0x42) comes from the device load, so it releases the stream at once: the load
    goes at the stream's speed instead of one fault at a time. Before, every page was a
    request (about 15,700 in the 10 s reply deadline, on a loaded machine, for 256 MiB)."""
    capabilities, parameters = postcopy_settings(preempt=preempt)
    pair = await run_pair(
        default_block_specs(LOAD_RAM),
        capabilities=capabilities,
        parameters=parameters,
        source_command=LOAD_READS_ALL,
    )
    assert_completed_and_verified(pair)
    requests = pair.incoming.query()["postcopy-requests"]
    pages = LOAD_RAM // 4096
    # One fault at a time is a request per page; at the stream's speed a few in ten (a
    # quarter was once passed, 2094 of 8192, on a loaded machine).
    assert 0 < requests < pages // 2, f"{requests} requests for {pages} pages"
