"""A pause at postcopy's very end: every page is out, and then the link dies.

The source has nothing left to send: only the destination's SHUT is to come. If the
return path goes silent now no send can notice, so the wait for SHUT itself must be
bounded by x-channel-timeout (recovery campaign run 30: the source stayed
postcopy-active for SHUT_TIMEOUT). The destination meanwhile has placed every page
and closed its userfaultfd; its SHUT is lost (here: migrate-pause lands as it goes
out), so it pauses too, and the recovery must work from there: every page is here, only
the stream's end is left (campaign run 80: the resume restarted the fault handler on
the closed uffd). Both in one trio run (tests/postcopy_harness.py), real guests,
real sockets.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from postcopy_harness import Pair, postcopy_settings, run_pair

from trimig.loadvm.postcopy import PostcopyIncoming
from trimig.migration import MigrationStatus
from trimig.ram_blocks import default_block_specs
from trimig.savevm.return_path import answer_timeout

TIMEOUT_MS = 1000
#: How long the source waits for SHUT with that x-channel-timeout, and how far past that
#: it may notice on a loaded machine.
BOUND = answer_timeout(TIMEOUT_MS / 1000)
SLACK = 4.0


@pytest.mark.parametrize("preempt", [False, True], ids=["main-only", "preempt"])
async def test_silence_after_the_last_page_pauses_and_recovers(
    preempt: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    capabilities, parameters = postcopy_settings(preempt=preempt, max_postcopy_bandwidth="16M")
    pairs: list[Pair] = []
    real_finish = PostcopyIncoming.finish

    async def finish_then_go_silent(postcopy: PostcopyIncoming) -> None:
        await real_finish(postcopy)  # every page placed, the uffd closed
        pair = pairs[0]
        pair.notes["finished"] = time.monotonic()
        # The SHUT does not come: the source, with nothing left to send, pauses.
        with trio.fail_after(BOUND + SLACK):
            await pair.outgoing.status.wait_value(MigrationStatus.POSTCOPY_PAUSED)
        pair.notes["source paused"] = time.monotonic()
        pair.incoming.pause()  # and our SHUT is lost as it goes out

    monkeypatch.setattr(PostcopyIncoming, "finish", finish_then_go_silent)

    def keep_pair(pair: Pair, name: str, info: dict[str, Any]) -> None:
        if not pairs:
            pairs.append(pair)

    def bound_once_running(pair: Pair, name: str, info: dict[str, Any]) -> None:
        # From the switch on (the destination here starts its guest after accepting,
        # which on a loaded machine can take longer than the bound).
        if name == "MIGRATION" and info["status"] == "postcopy-active":
            pair.outgoing.parameters.set("x-channel-timeout", TIMEOUT_MS)

    async def recover(pair: Pair) -> None:
        assert pair.outgoing.status.value is MigrationStatus.POSTCOPY_PAUSED, pair.outgoing.query()
        assert pair.incoming.status.value is MigrationStatus.POSTCOPY_PAUSED
        assert "x-channel-timeout" in pair.outgoing.query()["error-desc"]
        listener = await pair.incoming.recovery_listener("tcp:127.0.0.1:0")
        try:
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    stream = await listener.accept()
                    await pair.incoming.recover(stream, listener=listener if preempt else None)

                nursery.start_soon(destination)
                await pair.outgoing.recover(str(listener.address))
        finally:
            await listener.aclose()
        guest = pair.incoming.guest
        assert guest is not None
        await trio.sleep(0.2)  # the moved guest runs on
        await guest.stop()
        pair.verdict = await guest.verify()

    pair = await run_pair(
        default_block_specs(16 << 20),
        capabilities=capabilities,
        parameters=parameters,
        on_dest_event=keep_pair,
        on_source_event=bound_once_running,
        after=recover,
    )
    waited = pair.notes["source paused"] - pair.notes["finished"]
    assert BOUND - 0.5 < waited < BOUND + SLACK, waited
    assert pair.outgoing.status.value is MigrationStatus.COMPLETED
    assert pair.incoming.status.value is MigrationStatus.COMPLETED
    assert pair.outgoing.recoveries == 1 and pair.incoming.recoveries == 1
    assert pair.verdict is not None and pair.verdict.verified, pair.verdict
