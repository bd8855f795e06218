"""A small trio QMP client (used by trimig's CLI and tests).

::

    async with connect_unix("/run/trimig.qmp") as qmp:
        status = await qmp.execute("query-status")
        async with qmp.events() as events:
            await qmp.execute("stop")
            async for event in events:
                ...

``execute`` raises :class:`~trimig.qmp.protocol.QmpError` for an error reply and
:class:`~trimig.errors.TransportError` when the connection is lost or cannot be made.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import trio

from .._trio import open_nursery
from ..errors import RemoteProtocolError, TransportError
from .protocol import (
    NEED_DATA,
    Event,
    Greeting,
    JsonParseError,
    JsonSplitter,
    Reply,
    encode_message,
    parse_server_message,
)

_RECEIVE_SIZE = 65536


class _Connection:
    """The byte stream plus the splitter: receive one server message at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._splitter = JsonSplitter(max_message_size=64 << 20)
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        try:
            async with self._send_lock:
                await self.stream.send_all(encode_message(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError("QMP connection lost while sending") from exc

    async def receive(self) -> Greeting | Reply | Event:
        """The next message; TransportError at EOF, RemoteProtocolError on garbage."""
        while True:
            item = self._splitter.next_event()
            if isinstance(item, JsonParseError):
                raise RemoteProtocolError(f"QMP server sent invalid JSON: {item.desc}")
            if item is not NEED_DATA:
                return parse_server_message(item.value)
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TransportError("QMP connection lost") from exc
            if not data:
                raise TransportError("QMP server closed the connection")
            self._splitter.receive_data(data)


class EventSubscription:
    """Events received from the moment of subscription, as an async iterator (ends when the
    connection closes) and an async context manager (unsubscribes on exit). Unbounded: read it."""

    def __init__(self, client: QmpClient) -> None:
        self._client = client
        self._send, self._receive = trio.open_memory_channel[Event](math.inf)
        client._subscribers.add(self._send)
        if client._closed:
            self._send.close()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving events."""
        self._client._subscribers.discard(self._send)
        self._send.close()
        self._receive.close()

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class QmpClient:
    """A negotiated QMP session; create it with :func:`connect_unix` (or :func:`open_client`)."""

    def __init__(self, connection: _Connection, greeting: Greeting) -> None:
        self._connection = connection
        #: The server's greeting (``version``, ``capabilities``).
        self.greeting = greeting
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Reply]] = {}
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()
        self._closed = False
        #: Why the connection ended (None while open).
        self.closed_reason: str | None = None

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; QmpError for an error reply."""
        if self._closed:
            raise TransportError(f"QMP connection is closed ({self.closed_reason})")
        request_id = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        send, receive = trio.open_memory_channel[Reply](1)
        self._pending[request_id] = send
        try:
            await self._connection.send(message)
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise TransportError(
                    f"QMP connection lost before the reply to {command} ({self.closed_reason})"
                ) from None
        finally:
            self._pending.pop(request_id, None)
        if reply.error is not None:
            raise reply.error
        return reply.result

    def events(self) -> EventSubscription:
        """Subscribe to events from now on (see :class:`EventSubscription`)."""
        return EventSubscription(self)

    async def _read_messages(self) -> None:
        """Route replies to their callers and events to subscribers until the connection ends."""
        reason = "closed by the client"
        try:
            while True:
                message = await self._connection.receive()
                if isinstance(message, Event):
                    for subscriber in list(self._subscribers):
                        subscriber.send_nowait(message)
                elif isinstance(message, Reply):
                    routable = message.has_id and type(message.id) is int
                    waiter = self._pending.pop(message.id, None) if routable else None
                    if waiter is not None:
                        waiter.send_nowait(message)
                    elif message.error is not None and not message.has_id:
                        # The server could not parse something we sent: a bug on our side.
                        raise RemoteProtocolError(f"QMP server rejected input: {message.error}")
                # A second greeting is ignored.
        except (TransportError, RemoteProtocolError) as exc:
            reason = str(exc)
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.closed_reason = reason
        for waiter in self._pending.values():
            waiter.close()
        for subscriber in self._subscribers:
            subscriber.close()


async def _handshake(connection: _Connection, *, negotiate: bool) -> Greeting:
    greeting = await connection.receive()
    if not isinstance(greeting, Greeting):
        raise RemoteProtocolError(f"expected a QMP greeting, got {greeting!r}")
    if negotiate:
        await connection.send({"execute": "qmp_capabilities", "id": "negotiate"})
        reply = await connection.receive()
        while isinstance(reply, Event):  # not expected before negotiation, but harmless
            reply = await connection.receive()
        if not isinstance(reply, Reply):
            raise RemoteProtocolError(f"expected the qmp_capabilities reply, got {reply!r}")
        if reply.error is not None:
            raise reply.error
    return greeting


@asynccontextmanager
async def open_client(
    stream: trio.SocketStream, *, negotiate: bool = True
) -> AsyncIterator[QmpClient]:
    """Run a QMP session over an open stream (closed on exit)."""
    async with stream:
        connection = _Connection(stream)
        greeting = await _handshake(connection, negotiate=negotiate)
        client = QmpClient(connection, greeting)
        async with open_nursery() as nursery:
            nursery.start_soon(client._read_messages)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect_unix(
    path: str | os.PathLike[str], *, negotiate: bool = True, retry_for: float = 0.0
) -> AsyncIterator[QmpClient]:
    """Connect to the QMP unix socket at ``path``, read the greeting and negotiate.

    ``retry_for``: keep retrying for that many seconds while the socket does not exist yet or
    refuses connections (an engine that is still starting). TransportError names the path when
    nobody listens there.
    """
    path = os.fspath(path)
    deadline = trio.current_time() + retry_for
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
            break
        except OSError as exc:
            sock.close()
            retryable = isinstance(exc, FileNotFoundError | ConnectionRefusedError)
            if not retryable or trio.current_time() >= deadline:
                raise TransportError(
                    f"cannot connect to QMP socket {path}: {exc.strerror}"
                ) from exc
        await trio.sleep(0.05)
    async with open_client(trio.SocketStream(sock), negotiate=negotiate) as client:
        yield client
