"""The guest library's request handling, driven in-process over a real socketpair.

The guest here runs in the test process (no userfaultfd MISSING registration is
involved, so nothing can block); the engine side is the raw protocol.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trimig.errors import ConfigError, GuestError, LocalProtocolError
from trimig.guest import (
    Guest,
    GuestBlock,
    GuestProgram,
    GuestRequestError,
    Role,
    VerifyResult,
    protocol,
)
from trimig.guest.protocol import Event
from trimig.kernel.memory import memfd_create

MiB = 1 << 20


class Recorder(GuestProgram):
    """Records every hook call; ``fail`` makes the named hook raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: str | None = None
        self.steps = 0

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if self.fail == name:
            raise RuntimeError(f"{name} failed on purpose")

    def on_attach(self, guest: Guest, role: Role) -> None:
        self._record("on_attach", role)

    def step(self) -> float | None:
        self.steps += 1
        time.sleep(0.001)
        return None

    def on_stop(self) -> None:
        self._record("on_stop")

    def on_cont(self) -> None:
        self._record("on_cont")

    def save_state(self) -> bytes:
        self._record("save_state")
        return b"\x00state\xff"

    def load_state(self, state: bytes) -> None:
        self._record("load_state", state)

    def verify(self) -> VerifyResult:
        self._record("verify")
        return VerifyResult(False, "bad on purpose", {"page": 3})

    def on_notify(self, event: Event) -> None:
        self._record("on_notify", event)


class Harness:
    def __init__(self) -> None:
        self.engine, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.engine.settimeout(5)
        self.guest = Guest(guest_end)
        self.program = Recorder()
        self.next_id = 0

    def raw(self, data: bytes, fds: list[int] | None = None) -> dict[str, Any]:
        self.engine.sendmsg([data], protocol.ancillary_for(fds or []))
        assert self.guest.serve(self.program, 1.0)
        return self.receive()

    def receive(self) -> dict[str, Any]:
        received = protocol.receive_message(self.engine)
        assert received is not None
        message, fds = received
        self.reply_fds = fds
        return message

    def request(self, command: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        data = protocol.encode_message(protocol.request(command, self.next_id, **fields))
        reply = self.raw(data, fds)
        assert reply["reply"] == self.next_id
        return reply

    def memfd(self, size: int) -> int:
        fd = memfd_create("test")
        os.ftruncate(fd, size)
        return fd

    def attach(self, sizes: list[int], role: str = "new") -> dict[str, Any]:
        fds = [self.memfd(size) for size in sizes]
        try:
            blocks = [{"name": f"b{i}", "size": s, "page_size": 4096} for i, s in enumerate(sizes)]
            return self.request("attach", fds, blocks=blocks, role=role)
        finally:
            protocol.close_fds(fds)

    def close(self) -> None:
        # Guest.close() leaves the mappings to process exit; in-process, unmap them here.
        for block in self.guest.blocks:
            block.close()
        self.guest.close()
        self.engine.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connect_says_hello(monkeypatch):
    engine, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setenv(protocol.ENV_FD, str(guest_end.detach()))
    guest = Guest.connect()
    try:
        hello = json.loads(engine.recv(1000))
        assert hello == {"hello": 1, "pid": os.getpid()}
        assert protocol.ENV_FD not in os.environ
    finally:
        guest.close()
        engine.close()


def test_connect_errors(monkeypatch):
    monkeypatch.delenv(protocol.ENV_FD, raising=False)
    with pytest.raises(ConfigError, match="TRIMIG_GUEST_FD is not set"):
        Guest.connect()
    monkeypatch.setenv(protocol.ENV_FD, "seven")
    with pytest.raises(ConfigError, match="not an fd number"):
        Guest.connect()
    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with stream_a, stream_b, pytest.raises(ConfigError, match="not an AF_UNIX SOCK_SEQPACKET"):
        Guest.connect(stream_a.fileno())


def test_malformed_requests_get_error_replies(harness):
    reply = harness.raw(b"not json")
    assert reply["reply"] is None and not reply["ok"] and "not UTF-8 JSON" in reply["error"]
    reply = harness.raw(b'{"cmd": "ping"}')
    assert reply["reply"] is None and "without an integer id" in reply["error"]
    reply = harness.request("fly")
    assert not reply["ok"] and reply["error"] == "unknown command 'fly'"
    assert harness.request("ping")["ok"]


def test_requests_needing_memory_or_a_pause(harness):
    for command in ("cont", "stop", "save-state", "verify", "track-dirty", "register-missing"):
        reply = harness.request(command)
        assert (
            not reply["ok"]
            and reply["error"] == f"{command}: {command} needs memory: send attach first"
        )
    assert harness.attach([1 * MiB])["ok"]
    assert harness.request("cont") == {"reply": harness.next_id, "ok": True, "running": True}
    reply = harness.request("save-state")
    assert reply["error"] == "save-state: the guest is running; stop it first"
    assert harness.request("stop")["running"] is False
    assert [call[0] for call in harness.program.calls] == ["on_attach", "on_cont", "on_stop"]


def test_attach_maps_blocks(harness):
    reply = harness.attach([1 * MiB, 2 * MiB], role="incoming")
    assert reply["ok"]
    blocks = harness.guest.blocks
    assert [b.address for b in blocks] == reply["addresses"]
    assert [b.size for b in blocks] == [1 * MiB, 2 * MiB]
    assert harness.program.calls == [("on_attach", Role.INCOMING)]
    blocks[1].array()[5] = 7
    assert bytes(blocks[1].buffer[4:7]) == b"\x00\x07\x00"
    reply = harness.attach([1 * MiB])
    assert "already attached" in reply["error"]


@pytest.mark.parametrize(
    ("blocks", "nfds", "role", "error"),
    [
        ([{"name": "a", "size": 4096}], 2, "new", "1 blocks but 2 memfds"),
        ([{"name": "a", "size": 4096}], 1, "sideways", "unknown role 'sideways'"),
        ([{"name": "a", "size": 4096}] * 2, 2, "new", "block names are not unique"),
        ([{"name": "a", "size": 4097}], 1, "new", "not a positive multiple"),
        ([{"name": "a"}], 1, "new", "bad block"),
        ([{"name": "a", "size": 2 * MiB}], 1, "new", "smaller than the block"),
        ([], 0, "new", "non-empty list"),
    ],
)
def test_attach_errors_close_the_fds(harness, blocks, nfds, role, error):
    fds = [harness.memfd(1 * MiB) for _ in range(nfds)]
    try:
        before = open_fd_count()
        reply = harness.request("attach", fds, blocks=blocks, role=role)
        assert not reply["ok"] and error in reply["error"]
        assert open_fd_count() == before  # the guest's received copies are closed
        assert harness.guest.blocks == ()
    finally:
        protocol.close_fds(fds)


def test_fds_on_other_commands_are_closed(harness):
    fd = harness.memfd(4096)
    try:
        before = open_fd_count()
        reply = harness.request("ping", [fd])
        assert "carries no fds, got 1" in reply["error"]
        assert open_fd_count() == before
    finally:
        os.close(fd)


def test_state_hooks(harness):
    harness.attach([1 * MiB])
    reply = harness.request("save-state")
    assert protocol.decode_state(reply["state"]) == b"\x00state\xff"
    assert harness.request("load-state", state=protocol.encode_state(b"abc"))["ok"]
    assert harness.program.calls[-1] == ("load_state", b"abc")
    reply = harness.request("load-state", state="***")
    assert "not valid base64" in reply["error"]
    reply = harness.request("verify")
    assert reply["verified"] is False and reply["detail"] == "bad on purpose"
    assert reply["page"] == 3


def test_stop_saves_the_state_in_its_reply_when_asked(harness):
    """stop with save-state: true stops and saves in one round trip; a failed save
    leaves the guest stopped and says why in state-error."""
    harness.attach([1 * MiB])
    assert harness.request("cont")["ok"]
    reply = harness.request("stop", **{"save-state": True})
    assert reply["ok"] and reply["running"] is False
    assert protocol.decode_state(reply["state"]) == b"\x00state\xff"
    assert [call[0] for call in harness.program.calls[-2:]] == ["on_stop", "save_state"]
    assert "state" not in harness.request("stop")  # not asked: a plain stop
    assert harness.request("cont")["ok"]
    harness.program.fail = "save_state"
    reply = harness.request("stop", **{"save-state": True})
    assert reply["ok"] and reply["running"] is False and "state" not in reply
    assert reply["state-error"] == "save-state: save_state failed on purpose"
    assert harness.guest.running is False


def test_failing_hook_fails_only_its_request(harness):
    harness.attach([1 * MiB])
    harness.program.fail = "on_cont"
    reply = harness.request("cont")
    assert reply == {
        "reply": harness.next_id,
        "ok": False,
        "error": "cont: on_cont failed on purpose",
    }
    assert harness.guest.running is False
    harness.program.fail = None
    assert harness.request("cont")["ok"]


def test_notifications_inhibit_discard(harness):
    harness.attach([1 * MiB])
    block: GuestBlock = harness.guest.blocks[0]
    block.array()[:] = 1
    assert os.lseek(block.fd, 0, os.SEEK_DATA) == 0
    reply = harness.request("notify", event="postcopy-start")
    assert reply["discard_inhibited"] is True
    assert harness.guest.ram_discard_inhibited()
    assert harness.guest.discard_ram(block, 0, 1 * MiB) is False
    assert block.array()[100] == 1
    reply = harness.request("notify", event="postcopy-end")
    assert reply["discard_inhibited"] is False
    assert harness.guest.discard_ram(block, 0, 1 * MiB) is True
    with pytest.raises(OSError):
        os.lseek(block.fd, 0, os.SEEK_DATA)  # all hole again
    assert block.array()[100] == 0
    assert [c for c in harness.program.calls if c[0] == "on_notify"] == [
        ("on_notify", Event.POSTCOPY_START),
        ("on_notify", Event.POSTCOPY_END),
    ]
    reply = harness.request("notify", event="lunch")
    assert "unknown event 'lunch'" in reply["error"]
    with pytest.raises(ConfigError, match="outside block"):
        harness.guest.discard_ram(block, 0, 2 * MiB)


def test_quit_and_eof_end_serving(harness):
    protocol.send_message(harness.engine, protocol.request("quit", 1))
    assert not harness.guest.serve(harness.program, 1.0)
    assert harness.receive() == {"reply": 1, "ok": True}
    other = Harness()
    other.engine.close()
    assert not other.guest.serve(other.program, 1.0)
    other.guest.close()


def test_run_steps_only_while_running(harness):
    harness.attach([1 * MiB])
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(harness.guest.run(harness.program)))
    thread.start()
    try:

        def call(command: str) -> dict[str, Any]:
            harness.next_id += 1
            protocol.send_message(harness.engine, protocol.request(command, harness.next_id))
            return harness.receive()

        time.sleep(0.05)
        assert harness.program.steps == 0  # paused: no step
        assert call("cont")["ok"]
        time.sleep(0.05)
        assert call("stop")["ok"]
        steps = harness.program.steps
        assert steps > 0
        time.sleep(0.05)
        assert harness.program.steps == steps  # stop is honoured at once
        assert call("quit")["ok"]
        thread.join(5)
        assert status == [0]
    finally:
        harness.engine.shutdown(socket.SHUT_RDWR)
        thread.join(5)


def test_protocol_limits():
    with pytest.raises(LocalProtocolError, match="more than the limit"):
        protocol.encode_message({"cmd": "load-state", "state": "x" * protocol.MAX_MESSAGE_BYTES})
    with pytest.raises(GuestError, match="not a JSON object"):
        protocol.decode_message(b"[1]")
    with pytest.raises(GuestError, match="empty packet"):
        protocol.decode_message(b"")
    with pytest.raises(GuestError, match="must be a base64 string"):
        protocol.decode_state(5)


def test_truncated_packet_is_an_error():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.sendmsg([b"{" + b" " * protocol.MAX_MESSAGE_BYTES + b"}"])
        with pytest.raises(GuestError, match="longer than the limit"):
            protocol.receive_message(b)


def test_guest_request_error_is_a_guest_error():
    assert issubclass(GuestRequestError, GuestError)
