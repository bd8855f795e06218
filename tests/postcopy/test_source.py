"""The source's page-request queue: validation, order, waiting, reset."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from trimig.errors import RemoteProtocolError
from trimig.postcopy.blocks import PageRequest
from trimig.postcopy.source import PageRequestQueue

MIB = 1 << 20


@attrs.frozen
class Layout:
    name: str
    size: int
    page_size: int = 4096


def make_queue() -> PageRequestQueue:
    return PageRequestQueue([Layout("pc.ram", 64 * 4096), Layout("huge", 8 * MIB, 2 * MIB)])


def test_requests_are_validated_and_counted() -> None:
    queue = make_queue()
    with pytest.raises(RemoteProtocolError, match="without a block name and no previous"):
        queue.put(None, 0, 4096)
    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'nope'"):
        queue.put("nope", 0, 4096)
    with pytest.raises(RemoteProtocolError, match="not aligned to the block's page size 0x200000"):
        queue.put("huge", 4096, 2 * MIB)
    with pytest.raises(RemoteProtocolError, match="not aligned"):
        queue.put("huge", 0, 4096)
    with pytest.raises(RemoteProtocolError, match="not aligned"):
        queue.put("pc.ram", 0, 0)
    with pytest.raises(RemoteProtocolError, match="runs past the block's end 0x800000"):
        queue.put("huge", 6 * MIB, 4 * MIB)
    assert len(queue) == 0
    assert queue.requests == 6


def test_requests_without_block_reuse_the_previous_one() -> None:
    queue = make_queue()
    queue.put("huge", 2 * MIB, 2 * MIB)
    assert queue.put(None, 0, 2 * MIB) == PageRequest("huge", 0, 2 * MIB)
    queue.put("pc.ram", 4096, 4096)
    # An invalid named request does not change the previous block.
    with pytest.raises(RemoteProtocolError):
        queue.put("nope", 0, 4096)
    assert queue.put(None, 8192, 8192) == PageRequest("pc.ram", 8192, 8192)
    assert queue.requests == 5


def test_fifo() -> None:
    queue = make_queue()
    assert queue.get_nowait() is None
    assert not queue.pending
    queue.put("pc.ram", 63 * 4096, 4096)
    queue.put("huge", 2 * MIB, 2 * MIB)
    assert queue.pending and len(queue) == 2
    assert queue.get_nowait() == PageRequest("pc.ram", 63 * 4096, 4096)
    assert queue.get_nowait() == PageRequest("huge", 2 * MIB, 2 * MIB)
    assert queue.get_nowait() is None and not queue.pending


async def test_get_waits_for_a_request() -> None:
    queue = make_queue()
    got: list[PageRequest] = []

    async def sender() -> None:
        got.append(await queue.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        queue.put("pc.ram", 0, 4096)
    assert got == [PageRequest("pc.ram", 0, 4096)]


async def test_wait_pending_cuts_a_sleep_short() -> None:
    queue = make_queue()

    async def return_path() -> None:
        await trio.sleep(0.01)
        queue.put("pc.ram", 0, 4096)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(return_path)
        with trio.move_on_after(10) as scope:
            await queue.wait_pending()
    assert not scope.cancelled_caught
    assert len(queue) == 1  # not taken


def test_reset_forgets_everything() -> None:
    queue = make_queue()
    queue.put("pc.ram", 0, 4096)
    queue.put("pc.ram", 4096, 4096)
    queue.get_nowait()
    queue.reset()
    assert len(queue) == 0
    with pytest.raises(RemoteProtocolError, match="no previous request"):
        queue.put(None, 0, 4096)
