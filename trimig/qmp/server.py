"""The QMP server: a unix socket speaking QEMU's monitor protocol to any QMP client.

Each connection runs in its own task inside the nursery ``serve_unix`` owns. A connection
starts with the greeting in capabilities-negotiation mode (only ``qmp_capabilities``; anything
else is ``CommandNotFound``), then serves the commands of :mod:`trimig.qmp.commands` one after
the other, replying in order, and forwards engine events once negotiated. A bad request gets
an error reply and never closes the connection; a client that goes away only ends its own task.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from typing import Any, Final

import attrs
import trio

from .._trio import open_nursery
from ..errors import ConfigError, TransportError
from . import commands
from .api import EngineControl
from .protocol import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    NEED_DATA,
    InvalidRequest,
    JsonParseError,
    JsonSplitter,
    QmpError,
    Request,
    encode_message,
    error_message,
    event_message,
    greeting_message,
    parse_request,
    return_message,
)

logger = logging.getLogger(__name__)

SOCKET_MODE: Final = 0o600
#: Events queued for one client before it counts as stuck and is disconnected.
EVENT_QUEUE_LIMIT: Final = 1024
#: A client that takes longer than this to accept one message is disconnected.
SEND_TIMEOUT: Final = 10.0
_RECEIVE_SIZE: Final = 65536
_CLOSE_TIMEOUT: Final = 1.0
#: accept() errors that mean "out of resources for now", not "the listener is broken".
_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


class _ClientGone(Exception):
    """The client closed its end or stopped reading; end this session."""


@attrs.define(eq=False)
class _Session:
    """One client connection. Writes are serialized so a reply and an event never interleave."""

    stream: trio.SocketStream
    name: str
    send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    negotiated: bool = False
    gone: bool = False

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; raises _ClientGone if the client is gone or stuck."""
        if self.gone:
            raise _ClientGone
        data = encode_message(message)
        try:
            async with self.send_lock:
                with trio.fail_after(SEND_TIMEOUT):
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            self.gone = True
            raise _ClientGone from exc


class QmpServer:
    """Serves QMP for one engine. ``serve_unix`` may run for several paths at once."""

    def __init__(self, engine: EngineControl) -> None:
        self._engine = engine

    async def serve_unix(
        self, path: str | os.PathLike[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on unix socket ``path`` (mode 0600) until cancelled.

        A stale socket file (nobody listening) is replaced; a live one, or a file that is not a
        socket, is a ConfigError. ``task_status.started(path)`` is called once clients can
        connect. The socket file is removed on exit (unless someone replaced it meanwhile).
        """
        path = os.fspath(path)
        listen_socket = await _bind_unix(path)
        identity = os.stat(path)
        try:
            async with open_nursery() as nursery:
                listener = trio.SocketListener(listen_socket)
                task_status.started(path)
                try:
                    while True:
                        try:
                            stream = await listener.accept()
                        except OSError as exc:
                            if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                                raise
                            logger.warning("QMP accept failed (%s); retrying", exc.strerror)
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._serve_connection, stream)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                        await listener.aclose()
        finally:
            listen_socket.close()
            _unlink_if_same(path, identity)

    async def serve_stream(self, stream: trio.SocketStream) -> None:
        """Serve one already connected client until it goes away (closes ``stream``)."""
        await self._serve_connection(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        session = _Session(stream, name=f"qmp-client-{id(stream):x}")
        logger.debug("%s connected", session.name)
        try:
            async with open_nursery() as nursery:
                try:
                    await session.send(greeting_message(commands.version_info(), []))
                    await self._receive_loop(session, nursery)
                except _ClientGone:
                    pass
                nursery.cancel_scope.cancel()
        except Exception:  # contained: one broken session must not end the server
            logger.exception("%s failed", session.name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await stream.aclose()
            logger.debug("%s disconnected", session.name)

    async def _receive_loop(self, session: _Session, nursery: trio.Nursery) -> None:
        splitter = JsonSplitter()
        while True:
            while (item := splitter.next_event()) is not NEED_DATA:
                if isinstance(item, JsonParseError):
                    await session.send(error_message(GENERIC_ERROR, item.desc))
                    if not item.recoverable:
                        return
                    continue
                await self._handle_request(session, parse_request(item.value), nursery)
            try:
                data = await session.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            splitter.receive_data(data)

    async def _handle_request(
        self, session: _Session, request: Request | InvalidRequest, nursery: trio.Nursery
    ) -> None:
        if isinstance(request, InvalidRequest):
            await session.send(
                error_message(GENERIC_ERROR, request.desc, request.id, has_id=request.has_id)
            )
            return
        try:
            if not session.negotiated:
                await self._negotiate(session, request, nursery)
                result: Any = {}
            else:
                spec = commands.lookup(request.command)
                arguments = commands.check_arguments(spec, request.arguments)
                if spec.reply_first:
                    await session.send(return_message({}, request.id, has_id=request.has_id))
                    await self._run_after_reply(spec, arguments)
                    return
                result = await commands.run_handler(spec, self._engine, arguments)
        except QmpError as exc:
            reply = error_message(exc.error_class, exc.desc, request.id, has_id=request.has_id)
        except _ClientGone:
            raise
        except Exception as exc:  # a bug in a handler must not take the connection down
            logger.exception("QMP command %r failed unexpectedly", request.command)
            desc = f"internal error in {request.command}: {type(exc).__name__}: {exc}"
            reply = error_message(GENERIC_ERROR, desc, request.id, has_id=request.has_id)
        else:
            reply = return_message(result, request.id, has_id=request.has_id)
        await session.send(reply)

    async def _negotiate(self, session: _Session, request: Request, nursery: trio.Nursery) -> None:
        """Capabilities-negotiation mode: only qmp_capabilities (QEMU's errors otherwise)."""
        if request.command != "qmp_capabilities":
            raise QmpError(
                COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        arguments = commands.check_arguments(commands.lookup("qmp_capabilities"), request.arguments)
        for capability in arguments.get("enable", []):
            raise QmpError(GENERIC_ERROR, f"Capability '{capability}' not available")
        await nursery.start(self._forward_events, session)
        session.negotiated = True

    async def _run_after_reply(self, spec: commands.CommandSpec, arguments: dict[str, Any]) -> None:
        """Run a reply-first command (quit); its errors can only be logged."""
        try:
            await commands.run_handler(spec, self._engine, arguments)
        except QmpError as exc:
            logger.error("QMP command %s failed after its reply: %s", spec.name, exc.desc)

    async def _forward_events(
        self, session: _Session, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe to engine events and copy them to this client, with timestamps.

        Events are queued per client so the engine's channel is always drained at once; a client
        with EVENT_QUEUE_LIMIT unsent events is disconnected.
        """
        queue_send, queue_receive = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE_LIMIT)
        async with self._engine.subscribe_events() as events, open_nursery() as nursery:
            nursery.start_soon(self._write_events, session, queue_receive)
            task_status.started()
            async with queue_send:
                async for name, data, timestamp in events:
                    message = event_message(name, data, timestamp)
                    try:
                        queue_send.send_nowait(message)
                    except trio.WouldBlock:
                        logger.warning("%s is not reading events; disconnecting it", session.name)
                        session.gone = True
                        with contextlib.suppress(OSError):
                            session.stream.socket.shutdown(socket.SHUT_RDWR)
                        return

    async def _write_events(
        self, session: _Session, queue: trio.MemoryReceiveChannel[dict[str, Any]]
    ) -> None:
        async with queue:
            async for message in queue:
                try:
                    await session.send(message)
                except _ClientGone:
                    with contextlib.suppress(OSError):
                        session.stream.socket.shutdown(socket.SHUT_RDWR)
                    return


async def _bind_unix(path: str) -> trio.socket.SocketType:
    """Create, bind (mode 0600) and listen on a unix stream socket at ``path``."""
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        # Connections to a bound socket are refused until listen(), so nobody can get in
        # before the mode is restricted.
        os.chmod(path, SOCKET_MODE)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on QMP socket {path}: {exc.strerror}") from exc
    return sock


def check_socket_path(path: str | os.PathLike[str]) -> None:
    """Refuse now (ConfigError) a path ``serve_unix`` would refuse: a live socket or a file that
    is not a socket. A stale socket file is removed. For callers with slow work to do first."""
    _remove_stale_socket(os.fspath(path))


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"QMP socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ConfigError(f"cannot check existing QMP socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise ConfigError(f"QMP socket {path} is in use by another process")


def _unlink_if_same(path: str, identity: os.stat_result) -> None:
    try:
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == (identity.st_dev, identity.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
