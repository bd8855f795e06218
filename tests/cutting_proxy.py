"""A loopback proxy between two engines that the test can cut and restore.

Run as ``python tests/cutting_proxy.py LISTEN TARGET`` (``tcp:127.0.0.1:0`` or
``unix:PATH`` each); it prints ``listening URI`` and then obeys one command per line on
stdin, answering ``ok COMMAND`` once done:

* ``hole``: the network goes silent. Every connection stops being forwarded, in both
  directions, without being closed (the peers' kernels see a live socket that takes
  nothing once its buffers are full); connections accepted while down wait, and go
  through once the network is ``up`` again (as a retried SYN would).
* ``hole-up`` / ``hole-down``: only the connections' first direction (the one the
  connecting side sends: the migration stream) or the other (the return path) goes silent.
* ``reset``: every connection is reset (RST to both peers), and connections accepted
  while down are reset at once.
* ``hole CHANNEL`` / ``reset CHANNEL``: only one channel of the current migration goes
  silent or is reset: ``main`` (both directions of its first connection), ``stream`` or
  ``return`` (one direction of it: the migration stream, the return path) or ``preempt``
  (its second connection, the urgent pages). The current migration's connections are
  those accepted since the last ``up`` (a recovery connects anew), in order.
* ``up``: new connections are forwarded again (the old ones stay as they were: dead).
* ``target URI``: forward new connections to URI (a destination listening anew).
* ``count``: answers ``ok count N`` with the number of connections accepted so far.

``CuttingProxy`` runs it as a subprocess for a test (trio or asyncio alike: it only
writes lines to a pipe).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 65536


class _Connection:
    def __init__(self, client: trio.socket.SocketType) -> None:
        self.client = client
        self.server: trio.socket.SocketType | None = None
        #: Per direction (0: client -> server, 1: server -> client): forwarding stopped.
        self.silent = [False, False]
        self.scope = trio.CancelScope()
        #: The proxy's generation when accepted (``up`` starts a new one).
        self.generation = 0

    def reset(self) -> None:
        self.scope.cancel()
        for sock in (self.client, self.server):
            if sock is not None and sock.fileno() != -1:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()


class _Proxy:
    def __init__(self, target: str) -> None:
        self.target = target
        self.state = "up"
        self.connections: list[_Connection] = []
        self.pending: list[_Connection] = []
        self._nursery: trio.Nursery | None = None
        self.accepted = 0
        self.generation = 0

    async def _connect_target(self) -> trio.socket.SocketType:
        if self.target.startswith("unix:"):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(self.target[len("unix:") :])
            return sock
        host, _, port = self.target[len("tcp:") :].rpartition(":")
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, int(port)))
        return sock

    async def serve(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                client, _ = await listener.accept()
                self.accepted += 1
                connection = _Connection(client)
                connection.generation = self.generation
                if self.state == "reset":
                    connection.reset()
                    continue
                self.connections.append(connection)
                if self.state.startswith("hole"):
                    # A connect during the outage: it goes through once the network is
                    # back (as a retried SYN would), forwarded from ``up`` on.
                    self.pending.append(connection)
                    continue
                nursery.start_soon(self._forward_connection, connection)

    async def _forward_connection(self, connection: _Connection) -> None:
        with connection.scope:
            try:
                connection.server = await self._connect_target()
            except (OSError, trio.ClosedResourceError):
                connection.reset()
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, connection, 0)
                nursery.start_soon(self._pump, connection, 1)

    async def _pump(self, connection: _Connection, direction: int) -> None:
        assert connection.server is not None
        source, sink = (
            (connection.client, connection.server)
            if direction == 0
            else (connection.server, connection.client)
        )
        try:
            while True:
                if connection.silent[direction]:
                    await trio.sleep_forever()
                data = await source.recv(CHUNK)
                if connection.silent[direction]:
                    await trio.sleep_forever()  # swallowed: never arrives
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                view = memoryview(data)
                while view:
                    sent = await sink.send(view)
                    view = view[sent:]
        except trio.ClosedResourceError:
            return  # reset meanwhile
        except OSError:
            if connection.silent[direction]:
                await trio.sleep_forever()  # the network is down: no reset gets through
            connection.reset()

    def _channel(self, name: str) -> tuple[_Connection, tuple[int, ...]]:
        """The connection and directions of channel ``name`` of the current migration."""
        current = [c for c in self.connections if c.generation == self.generation]
        index = 1 if name == "preempt" else 0
        if len(current) <= index:
            raise LookupError(f"no {name} connection (the current migration has {len(current)})")
        directions = {"stream": (0,), "return": (1,)}.get(name, (0, 1))
        return current[index], directions

    def command(self, line: str) -> str:
        if line == "count":
            return f"count {self.accepted}"
        how, _, channel = line.partition(" ")
        if how in ("hole", "reset") and channel:
            try:
                connection, directions = self._channel(channel)
            except LookupError as error:
                return f"error: {error}"
            if how == "reset":
                connection.reset()
                self.connections.remove(connection)
            else:
                for direction in directions:
                    connection.silent[direction] = True
            return line
        if line in ("hole", "hole-up", "hole-down"):
            directions = {"hole": (0, 1), "hole-up": (0,), "hole-down": (1,)}[line]
            for connection in self.connections:
                for direction in directions:
                    connection.silent[direction] = True
            self.state = "hole"
        elif line == "reset":
            for connection in self.connections:
                connection.reset()
            self.connections = []
            self.pending = []
            self.state = "reset"
        elif line == "up":
            self.state = "up"
            self.generation += 1
            for connection in self.pending:
                connection.generation = self.generation
            assert self._nursery is not None
            for connection in self.pending:
                self._nursery.start_soon(self._forward_connection, connection)
            self.pending = []
        elif line.startswith("target "):
            self.target = line.split(None, 1)[1]
        else:
            return f"error: unknown command {line!r}"
        return line


async def _main(listen: str, target: str) -> None:
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        address = listen
    else:
        host, _, port = listen[len("tcp:") :].rpartition(":")
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, int(port)))
        address = f"tcp:{host}:{listener.getsockname()[1]}"
    listener.listen(64)
    proxy = _Proxy(target)
    print(f"listening {address}", flush=True)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.serve, listener)
        buffered = b""
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                break
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                answer = proxy.command(line.decode().strip())
                print(answer if answer.startswith("error: ") else f"ok {answer}", flush=True)
        nursery.cancel_scope.cancel()


class CuttingProxy:
    """The proxy as a subprocess: ``uri`` to connect to, ``send(command)`` to cut."""

    def __init__(self, listen: str, target: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "cutting_proxy.py"), listen, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.close()
            raise AssertionError(f"the proxy did not start: {line!r}")
        self.uri = line.split()[1]

    def send(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer.startswith("ok "):
            raise AssertionError(f"the proxy answered {answer!r} to {command!r}")
        return answer[3:]

    def accepted(self) -> int:
        return int(self.send("count").split()[1])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def cutting_proxy(listen: str, target: str) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(listen, target)
    try:
        yield proxy
    finally:
        proxy.close()


if __name__ == "__main__":
    trio.run(_main, sys.argv[1], sys.argv[2])
