"""The QMP server over real unix sockets, against the fake engine (logic tests)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import pytest
import trio
from qmp_helpers import FakeEngine, RawClient, listening, raw_client, socket_mode

from trimig.errors import ConfigError
from trimig.qmp.commands import COMMANDS, execute_command, version_info
from trimig.qmp.protocol import QmpError
from trimig.qmp.server import EVENT_QUEUE_LIMIT, QmpServer


def generic(desc: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}, **extra}


async def test_greeting_and_negotiation(qmp_path: str) -> None:
    async with raw_client(qmp_path, negotiate=False) as client:
        # The greeting was read by raw_client; check its exact shape on a second connection.
        pass
    stream = await trio.open_unix_socket(qmp_path)
    async with stream:
        client = RawClient(stream)
        greeting = await client.receive()
        assert greeting == {"QMP": {"version": version_info(), "capabilities": []}}
        assert client.raw.endswith(b"\r\n")
        assert greeting["QMP"]["version"]["qemu"]["major"] >= 10
        assert await client.execute("qmp_capabilities", {}, id=1) == {"return": {}, "id": 1}
        reply = await client.execute("qmp_capabilities", id=2)
        assert reply == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored",
            },
            "id": 2,
        }
        assert await client.execute("query-status") == {
            "return": {"running": True, "status": "running"}
        }


async def test_commands_refused_before_negotiation(qmp_path: str, engine: FakeEngine) -> None:
    async with raw_client(qmp_path, negotiate=False) as client:
        for command in ("query-status", "stop", "no-such-command"):
            reply = await client.execute(command, id=command)
            assert reply == {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
                },
                "id": command,
            }
        assert engine.running  # "stop" did not run
        reply = await client.execute("qmp_capabilities", {"enable": ["oob"]})
        assert reply == generic("Capability 'oob' not available")
        reply = await client.execute("qmp_capabilities", {"enable": ["bogus"]})
        assert reply == generic("Parameter 'enable[0]' does not accept value 'bogus'")
        reply = await client.execute("qmp_capabilities", {"x": 1})
        assert reply == generic("Parameter 'x' is unexpected")
        await client.negotiate()
        assert (await client.execute("stop")) == {"return": {}}
        assert not engine.running


async def test_unknown_command(qmp_path: str) -> None:
    async with raw_client(qmp_path) as client:
        reply = await client.execute("foo", id=9)
        assert reply == {
            "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"},
            "id": 9,
        }


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    [
        ("migrate", {"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
        ("migrate", {}, "Either 'uri' or 'channels' argument should be present"),
        ("migrate-incoming", {"uri": None}, "Invalid parameter type for 'uri', expected: string"),
        ("migrate", {"uri": "tcp:a:1", "blk": True}, "Parameter 'blk' is unexpected"),
        (
            "migrate",
            {"uri": "tcp:a:1", "resume": "yes"},
            "Invalid parameter type for 'resume', expected: boolean",
        ),
        ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
        (
            "migrate-set-capabilities",
            {"capabilities": {"events": True}},
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events"}]},
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "x", "state": 1},
                ]
            },
            "Invalid parameter type for 'capabilities[1].state', expected: boolean",
        ),
        ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
        (
            "migrate",
            {
                "channels": [
                    {
                        "channel-type": "main",
                        "addr": {"transport": "socket", "type": "inet", "host": "h", "port": 4},
                    }
                ]
            },
            "Invalid parameter type for 'channels[0].addr.port', expected: string",
        ),
        (
            "migrate",
            {"channels": [{"channel-type": "main", "addr": {"transport": "tape"}}]},
            "Parameter 'channels[0].addr.transport' does not accept value 'tape'",
        ),
        (
            "migrate",
            {
                "channels": [
                    {
                        "channel-type": "main",
                        "addr": {"transport": "socket", "type": "unix", "path": "/p", "host": "h"},
                    }
                ]
            },
            "Parameter 'channels[0].addr.host' is unexpected",
        ),
    ],
)
async def test_bad_arguments_name_the_argument(
    qmp_path: str, engine: FakeEngine, command: str, arguments: dict[str, Any], desc: str
) -> None:
    async with raw_client(qmp_path) as client:
        assert await client.execute(command, arguments, id="x") == generic(desc, id="x")
        # Validation errors come before any side effect.
        assert engine.calls == []
        assert (await client.execute("query-status"))["return"]["running"] is True


async def test_engine_errors_become_generic_errors(qmp_path: str, engine: FakeEngine) -> None:
    async with raw_client(qmp_path) as client:
        reply = await client.execute("migrate-set-parameters", {"downtime-limit": "soon"})
        assert reply == generic("parameter 'downtime-limit' must be an integer, got 'soon'")
        reply = await client.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]}
        )
        assert reply == generic("unknown capability 'nope'")
        assert await client.execute("migrate-start-postcopy") == generic(
            "postcopy can only start while a migration is active"
        )


async def test_migration_commands_reach_the_engine(qmp_path: str, engine: FakeEngine) -> None:
    async with raw_client(qmp_path) as client:
        caps = [
            {"capability": "return-path", "state": True},
            {"capability": "postcopy-ram", "state": True},
        ]
        assert await client.execute("migrate-set-capabilities", {"capabilities": caps}) == {
            "return": {}
        }
        reply = await client.execute("query-migrate-capabilities")
        assert {"capability": "postcopy-ram", "state": True} in reply["return"]
        params = {"downtime-limit": 50, "max-bandwidth": 1000}
        assert await client.execute("migrate-set-parameters", params) == {"return": {}}
        assert (await client.execute("query-migrate-parameters"))["return"] == params
        assert await client.execute("query-migrate") == {"return": {}}
        await client.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
        assert (await client.execute("query-migrate"))["return"]["status"] == "active"
        assert await client.execute("migrate-start-postcopy") == {"return": {}}
        assert await client.execute("migrate_cancel") == generic(
            "migrate_cancel is not allowed once postcopy has started"
        )
        await client.execute("migrate-incoming", {"uri": "unix:/tmp/x"})
        names = {entry["name"] for entry in (await client.execute("query-commands"))["return"]}
        assert names == set(COMMANDS)
        assert (await client.execute("query-version"))["return"] == version_info()
    assert engine.calls == [
        ("set_capabilities", {"return-path": True, "postcopy-ram": True}),
        ("set_parameters", params),
        ("migrate", "tcp:127.0.0.1:4444"),
        ("start_postcopy", None),
        ("migrate_incoming", "unix:/tmp/x"),
    ]


@pytest.mark.parametrize(
    ("addr", "uri"),
    [
        (
            {"transport": "socket", "type": "inet", "host": "10.0.0.1", "port": "4444"},
            "tcp:10.0.0.1:4444",
        ),
        ({"transport": "socket", "type": "inet", "host": "::1", "port": "0"}, "tcp:[::1]:0"),
        ({"transport": "socket", "type": "unix", "path": "/run/m.sock"}, "unix:/run/m.sock"),
        (
            {"transport": "exec", "args": ["/bin/sh", "-c", "cat > /dev/null"]},
            "exec:cat > /dev/null",
        ),
        ({"transport": "exec", "args": ["nc", "host name", "4444"]}, "exec:nc 'host name' 4444"),
        ({"transport": "rdma", "host": "h", "port": "7"}, "rdma:h:7"),
    ],
)
async def test_migrate_channels_become_uris(
    engine: FakeEngine, addr: dict[str, Any], uri: str
) -> None:
    await execute_command(engine, "migrate", {"channels": [{"channel-type": "main", "addr": addr}]})
    assert engine.calls == [("migrate", uri)]


async def test_migrate_uri_and_channels_conflicts(engine: FakeEngine) -> None:
    main = {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/p"}}
    cases = [
        ({"uri": "unix:/p", "channels": [main]}, "mutually exclusive"),
        ({"channels": []}, "exactly one channel"),
        ({"channels": [main, main]}, "exactly one channel"),
        ({"channels": [{**main, "channel-type": "cpr"}]}, "exactly one channel"),
        (
            {
                "channels": [
                    {
                        "channel-type": "main",
                        "addr": {"transport": "socket", "type": "fd", "str": "3"},
                    }
                ]
            },
            "not supported",
        ),
        ({"uri": "unix:/p", "resume": True}, "needs postcopy-paused"),
    ]
    for arguments, fragment in cases:
        with pytest.raises(QmpError) as info:
            await execute_command(engine, "migrate", arguments)
        assert info.value.error_class == "GenericError" and fragment in info.value.desc
    assert engine.calls == []


async def test_id_is_echoed_whatever_its_type(qmp_path: str) -> None:
    async with raw_client(qmp_path) as client:
        for request_id in (1, "abc", None, 2.5, [1, {"a": 2}], {"k": "v"}, True):
            reply = await client.execute("query-status", id=request_id)
            assert reply["id"] == request_id and "return" in reply
            reply = await client.execute("nope", id=request_id)
            assert reply["id"] == request_id and reply["error"]["class"] == "CommandNotFound"
        assert "id" not in await client.execute("query-status")


async def test_malformed_input_does_not_close_the_connection(qmp_path: str) -> None:
    async with raw_client(qmp_path) as client:
        await client.send_bytes(b'{"execute": }')
        reply = await client.receive()
        assert reply["error"]["class"] == "GenericError" and "id" not in reply
        assert reply["error"]["desc"].startswith("JSON parse error")
        await client.send_bytes(b"[1, 2]")
        assert await client.receive() == generic("QMP input must be a JSON object")
        await client.send_bytes(b'{"execute": "query-status", "id": 4, "oops": 1}')
        assert await client.receive() == generic("QMP input member 'oops' is unexpected", id=4)
        await client.send_bytes(b'{"execute": ["stop"]}')
        assert await client.receive() == generic("QMP input member 'execute' must be a string")
        # Half a message, then a control character to resynchronize (qmp-spec).
        await client.send_bytes(b'{"execute": "sto\x1b')
        assert "invalid character" in (await client.receive())["error"]["desc"]
        # Pipelined commands in one write, no separators, single quotes: replies in order.
        await client.send_bytes(b"{'execute':'query-status','id':1}{\"execute\":\"stop\",\"id\":2}")
        assert (await client.receive())["id"] == 1
        assert await client.receive() == {"return": {}, "id": 2}


async def test_oversized_message_closes_only_that_connection(qmp_path: str) -> None:
    async def send_too_much(client: RawClient) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send_bytes(b'{"execute": "' + b"x" * (2 << 20))

    async with (
        raw_client(qmp_path) as bad,
        raw_client(qmp_path) as good,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(send_too_much, bad)
        reply = await bad.receive()
        assert "exceeds" in reply["error"]["desc"]
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await bad.receive()
        assert "return" in await good.execute("query-status")


async def test_events_reach_every_negotiated_client(qmp_path: str, engine: FakeEngine) -> None:
    async with (
        raw_client(qmp_path) as first,
        raw_client(qmp_path) as second,
        raw_client(qmp_path, negotiate=False) as unnegotiated,
    ):
        assert engine.subscriber_count == 2
        await first.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        await first.send({"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": "m"})
        # The MIGRATION event and the reply may come in either order on the issuing client.
        pair = [await first.receive(), await first.receive()]
        assert {"return": {}, "id": "m"} in pair
        event = next(message for message in pair if "event" in message)
        for message in (event, await second.receive()):
            assert message["event"] == "MIGRATION" and message["data"] == {"status": "active"}
            assert set(message["timestamp"]) == {"seconds", "microseconds"}
            assert message["timestamp"]["seconds"] > 1_600_000_000
        engine.emit("MIGRATION_PASS", {"pass": 3})
        engine.emit("STOP")
        for client in (first, second):
            assert (await client.receive())["data"] == {"pass": 3}
            stop = await client.receive()
            assert stop["event"] == "STOP" and "data" not in stop
        # The unnegotiated client got nothing: its next message is the reply to its command.
        assert (await unnegotiated.execute("qmp_capabilities", id="n")) == {"return": {}, "id": "n"}
        assert engine.subscriber_count == 3
    await wait_for(lambda: engine.subscriber_count == 0)


async def wait_for(condition: Any, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_client_vanishing_mid_command_disturbs_nobody(
    qmp_path: str, engine: FakeEngine
) -> None:
    engine.migrate_gate = trio.Event()
    async with raw_client(qmp_path) as other:
        leaver = await trio.open_unix_socket(qmp_path)
        client = RawClient(leaver)
        await client.receive()
        await client.negotiate()
        await client.send({"execute": "migrate", "arguments": {"uri": "tcp:h:9"}, "id": 1})
        await engine.migrate_entered.wait()
        # The client goes away while its command is running (RST, not a polite close).
        leaver.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await leaver.aclose()
        assert "return" in await other.execute("query-status")
        engine.migrate_gate.set()
        # The command completed in the engine; the server and the other client are unaffected.
        await wait_for(lambda: ("migrate", "tcp:h:9") in engine.calls)
        assert (await other.execute("query-migrate"))["return"]["status"] == "active"
        await wait_for(lambda: engine.subscriber_count == 1)
    async with raw_client(qmp_path) as late:
        assert "return" in await late.execute("query-status")


async def test_client_that_stops_reading_events_is_dropped(
    qmp_path: str, engine: FakeEngine
) -> None:
    count = EVENT_QUEUE_LIMIT * 4
    received: list[Any] = []

    async def read_events(client: RawClient) -> None:
        while len(received) < count:
            received.append((await client.receive())["data"]["pass"])

    async with raw_client(qmp_path) as stuck, raw_client(qmp_path) as healthy:
        stuck.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_events, healthy)
            for n in range(count):
                engine.emit("MIGRATION_PASS", {"pass": n})  # never blocks the engine
                if n % (EVENT_QUEUE_LIMIT // 2) == 0:  # bursts the healthy reader can absorb
                    await wait_for(lambda n=n: len(received) > n)
        # The healthy client received everything, in order; the stuck one was dropped.
        assert received == list(range(count))
        assert engine.subscriber_count == 1
        assert "return" in await healthy.execute("query-status")


async def test_quit_replies_before_the_engine_quits(qmp_path: str, engine: FakeEngine) -> None:
    async with raw_client(qmp_path) as client:
        assert await client.execute("quit", id="q") == {"return": {}, "id": "q"}
        await engine.quit_called.wait()


async def test_socket_mode_stale_file_and_cleanup(socket_dir: str, engine: FakeEngine) -> None:
    path = os.path.join(socket_dir, "q.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nobody listens on, as left by a crashed engine
    stale.close()
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(QmpServer(engine).serve_unix, path) == path
            assert socket_mode(path) == 0o600
            assert listening(path)
            # A second server on the same live path is refused and leaves it alone.
            with pytest.raises(ConfigError, match="in use"):
                await QmpServer(engine).serve_unix(path)
            assert listening(path)
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old_umask)
    assert not os.path.exists(path)


async def test_refuses_to_replace_a_regular_file(socket_dir: str, engine: FakeEngine) -> None:
    path = os.path.join(socket_dir, "not-a-socket")
    with open(path, "w") as file:
        file.write("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await QmpServer(engine).serve_unix(path)
    with open(path) as file:
        assert file.read() == "precious"


async def test_a_crashing_handler_does_not_take_the_connection_down(
    qmp_path: str, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("oops")

    monkeypatch.setattr(engine, "query_migrate", broken)
    async with raw_client(qmp_path) as client:
        reply = await client.execute("query-migrate", id=1)
        assert reply["id"] == 1 and reply["error"]["class"] == "GenericError"
        assert "internal error in query-migrate" in reply["error"]["desc"]
        assert "return" in await client.execute("query-status")
