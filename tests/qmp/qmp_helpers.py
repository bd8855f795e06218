"""Helpers for the QMP tests: a fake engine (logic only), a raw socket client, and a QMP server
running in its own thread with its own trio.run (for the asyncio qemu.qmp client and the CLI)."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trimig.errors import ConfigError
from trimig.qmp.api import EngineControl, EngineEvent
from trimig.qmp.protocol import NEED_DATA, JsonParseError, JsonSplitter
from trimig.qmp.server import QmpServer


class FakeEngine:
    """Implements EngineControl with plain state; records calls. For logic tests only."""

    def __init__(self) -> None:
        self.capabilities = {"events": False, "postcopy-ram": False, "return-path": False}
        self.parameters: dict[str, Any] = {"max-bandwidth": 0, "downtime-limit": 300}
        self.calls: list[tuple[str, Any]] = []
        self.status = "none"
        self.running = True
        self.quit_called = trio.Event()
        #: When set, migrate() waits for it (a slow command).
        self.migrate_gate: trio.Event | None = None
        self.migrate_entered = trio.Event()
        self._subscribers: set[trio.MemorySendChannel[EngineEvent]] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        for channel in list(self._subscribers):
            channel.send_nowait((name, data or {}, time.time()))

    def _set_status(self, status: str) -> None:
        self.status = status
        if self.capabilities["events"]:
            self.emit("MIGRATION", {"status": status})

    def set_capabilities(self, capabilities: dict[str, bool]) -> None:
        for name in capabilities:
            if name not in self.capabilities:
                raise ConfigError(f"unknown capability {name!r}")
        self.calls.append(("set_capabilities", dict(capabilities)))
        self.capabilities.update(capabilities)

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    def set_parameters(self, parameters: dict[str, Any]) -> None:
        for name, value in parameters.items():
            if name not in self.parameters:
                raise ConfigError(f"unknown parameter {name!r}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"parameter {name!r} must be an integer, got {value!r}")
        self.calls.append(("set_parameters", dict(parameters)))
        self.parameters.update(parameters)

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.parameters)

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        if resume:
            if self.status != "postcopy-paused":
                raise ConfigError("migrate with resume=true needs postcopy-paused")
            self.calls.append(("migrate-resume", uri))
            self._set_status("postcopy-recover-setup")
            return
        self.migrate_entered.set()
        if self.migrate_gate is not None:
            await self.migrate_gate.wait()
        self.calls.append(("migrate", uri))
        self._set_status("active")

    def migrate_pause(self) -> None:
        if self.status not in ("postcopy-active", "postcopy-recover"):
            raise ConfigError("migrate-pause needs postcopy-active or postcopy-recover")
        self.calls.append(("migrate-pause", None))
        self._set_status("postcopy-paused")

    async def migrate_recover(self, uri: str) -> None:
        if self.status != "postcopy-paused":
            raise ConfigError("migrate-recover needs postcopy-paused")
        self.calls.append(("migrate-recover", uri))

    async def migrate_incoming(self, uri: str) -> None:
        self.calls.append(("migrate_incoming", uri))
        self._set_status("setup")

    def start_postcopy(self) -> None:
        if self.status != "active":
            raise ConfigError("postcopy can only start while a migration is active")
        self.calls.append(("start_postcopy", None))
        self._set_status("postcopy-active")

    def cancel(self) -> None:
        if self.status.startswith("postcopy"):
            raise ConfigError("migrate_cancel is not allowed once postcopy has started")
        self.calls.append(("cancel", None))
        if self.status == "active":
            self._set_status("cancelled")

    def query_migrate(self) -> dict[str, Any]:
        if self.status == "none":
            return {}
        return {
            "status": self.status,
            "total-time": 1234,
            "ram": {
                "transferred": 3 << 20,
                "remaining": 1 << 20,
                "total": 4 << 20,
                "dirty-sync-count": 2,
                "mbps": 812.5,
                "dirty-pages-rate": 10,
            },
        }

    def query_status(self) -> dict[str, Any]:
        return {"running": self.running, "status": "running" if self.running else "paused"}

    async def stop(self) -> None:
        self.running = False
        self.emit("STOP")

    async def cont(self) -> None:
        self.running = True
        self.emit("RESUME")

    async def verify_guest(self) -> dict[str, Any]:
        self.calls.append(("x-guest-verify", None))
        return {"verified": True, "detail": "fake"}

    async def quit(self) -> None:
        self.calls.append(("quit", None))
        self.quit_called.set()

    @asynccontextmanager
    async def subscribe_events(self) -> AsyncIterator[trio.MemoryReceiveChannel[EngineEvent]]:
        send, receive = trio.open_memory_channel[EngineEvent](math.inf)
        self._subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)


def _check_protocol(engine: FakeEngine) -> EngineControl:
    return engine  # mypy checks FakeEngine against the protocol here


class RawClient:
    """A bare QMP socket client: send bytes/objects, receive parsed messages."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.splitter = JsonSplitter()
        self.raw = bytearray()

    async def send(self, message: Any) -> None:
        await self.stream.send_all(json.dumps(message).encode())

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Any:
        with trio.fail_after(5):
            while True:
                item = self.splitter.next_event()
                if isinstance(item, JsonParseError):
                    raise AssertionError(f"server sent bad JSON: {item.desc}")
                if item is not NEED_DATA:
                    return item.value
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.raw += data
                self.splitter.receive_data(data)

    async def execute(self, command: str, arguments: Any = None, **extra: Any) -> Any:
        message: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        await self.send(message)
        return await self.receive()

    async def negotiate(self) -> None:
        reply = await self.execute("qmp_capabilities")
        assert reply == {"return": {}}


@asynccontextmanager
async def raw_client(path: str, *, negotiate: bool = True) -> AsyncIterator[RawClient]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        client = RawClient(stream)
        greeting = await client.receive()
        assert "QMP" in greeting
        if negotiate:
            await client.negotiate()
        yield client


class ThreadedServer:
    """A FakeEngine and QmpServer in a thread of their own (own trio.run)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.engine: FakeEngine | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qmp-server", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.engine = FakeEngine()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            await nursery.start(QmpServer(self.engine).serve_unix, self.path)
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "server thread did not start"
        if self._error is not None:
            raise self._error

    def call(self, function: Any, *args: Any) -> Any:
        """Run a sync function in the server's trio thread."""
        return trio.from_thread.run_sync(function, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._cancel_scope is not None:
            self.call(self._cancel_scope.cancel)
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


def socket_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
