"""The engine's handle on a guest process (trio).

:class:`GuestProcess` spawns a guest program with its end of a ``SOCK_SEQPACKET``
socketpair, waits for its hello and then speaks the requests of
``docs/guest-protocol.md``: one request at a time, each answered within a timeout.
A guest that dies, closes its socket, answers with an error or does not answer in
time raises :class:`~trimig.errors.GuestError` naming the request; a dead guest's
error carries its exit status and the last lines it wrote.

No background task: the guest's stdout and stderr go to an unlinked temporary file
(read back only to report errors), so nothing has to drain a pipe.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import IO, Any

import attrs
import trio

from .._trio import open_nursery
from ..errors import GuestError, exit_status
from ..kernel.uffd import Userfaultfd
from ..ram_blocks import MappedBlock
from ..trace import trace
from . import protocol
from .protocol import Command, Event, Role
from .workload import workload_arguments

DEFAULT_REPLY_TIMEOUT = 10.0
DEFAULT_START_TIMEOUT = 30.0
#: Extra reply time for attach, load-state and verify per byte of guest RAM (64 MiB/s):
#: a guest may check its whole memory in each.
SECONDS_PER_RAM_BYTE = 1 / (64 << 20)
#: How long aclose() waits for each of quit, SIGTERM and SIGKILL to end the process.
CLOSE_STEP_TIMEOUT = 2.0
#: How often a reply deadline that follows progress (load_state's ``progress``) looks at it.
PROGRESS_POLL = 0.1


@attrs.frozen
class Verdict:
    """The answer to ``verify``: ``raw`` is the whole reply."""

    verified: bool
    detail: str
    raw: dict[str, Any]


def workload_command(
    *, dirty_rate: int | str | None = None, fill: str = "random", seed: int = 0
) -> list[str]:
    """The command line of the built-in workload guest with these options."""
    return [
        sys.executable,
        "-m",
        "trimig.guest.workload",
        *workload_arguments(dirty_rate=dirty_rate, fill=fill, seed=seed),
    ]


class GuestProcess:
    """A running guest process and its control socket. Create with :meth:`start` or
    :meth:`open`; always end with :meth:`aclose` (the context managers do)."""

    def __init__(
        self,
        process: trio.Process,
        sock: trio.socket.SocketType,
        output: IO[bytes],
        command: Sequence[str],
        *,
        reply_timeout: float,
    ) -> None:
        self._process = process
        self._sock = sock
        self._output = output
        self.command = list(command)
        self.reply_timeout = reply_timeout
        #: The guest's own pid (from its hello; the spawned process may be a wrapper).
        self.pid = process.pid
        #: True between a successful ``cont`` and the next ``stop``.
        self.running = False
        self._lock = trio.Lock()
        self._next_id = 0
        self._ram_bytes = 0
        self._socket_closed = False
        self._hello_received = False
        self._unresponsive = False  # it missed a reply deadline

    # -- life cycle ----------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        command: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> GuestProcess:
        """Spawn ``command`` (None: the built-in workload with default options, see
        :func:`workload_command`) and wait for its hello.

        ``env`` is added to this process's environment. Raises GuestError if the
        guest exits or says nothing valid within ``start_timeout`` seconds.
        """
        if command is None:
            command = workload_command()
        if not command:
            raise GuestError("the guest command is empty")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        output = tempfile.TemporaryFile(prefix="trimig-guest-")  # noqa: SIM115 (ours to close)
        child_env = {**os.environ, **(env or {}), protocol.ENV_FD: str(child.fileno())}
        try:
            try:
                process = await trio.lowlevel.open_process(
                    list(command),
                    pass_fds=(child.fileno(),),
                    env=child_env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                )
            finally:
                child.close()
        except OSError as error:
            parent.close()
            output.close()
            raise GuestError(f"cannot start guest {list(command)}: {error}") from error
        guest = cls(
            process,
            trio.socket.from_stdlib_socket(parent),
            output,
            command,
            reply_timeout=reply_timeout,
        )
        try:
            await guest._receive_hello(start_timeout)
        except BaseException:
            await guest.aclose()
            raise
        return guest

    @classmethod
    @asynccontextmanager
    async def open(
        cls, command: Sequence[str] | None = None, **options: Any
    ) -> AsyncIterator[GuestProcess]:
        """``start`` as an async context manager that ``aclose``\\ s the guest at exit."""
        guest = await cls.start(command, **options)
        try:
            yield guest
        finally:
            await guest.aclose()

    async def __aenter__(self) -> GuestProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return self._process.returncode

    async def wait(self) -> int:
        """Wait for the process to end; returns its exit status."""
        return await self._process.wait()

    async def aclose(self) -> None:
        """End the guest and release everything, under a shielded, time-bounded scope.

        A responsive guest gets ``quit`` and a little time to exit; one that gave no
        hello, missed a reply deadline or does not answer ``quit`` gets SIGTERM at once;
        SIGKILL follows if that is not enough. The process is reaped, the socket and
        the output file closed. Idempotent.
        """
        with trio.CancelScope(shield=True):
            ask = (
                self._process.returncode is None
                and not self._socket_closed
                and self._hello_received
                and not self._unresponsive
            )
            grace = self._socket_closed  # closed by quit() or by a death: it is ending
            if ask:
                try:
                    await self._request(Command.QUIT, timeout=CLOSE_STEP_TIMEOUT)
                    grace = True
                except GuestError:
                    grace = False
            endings = (None, self._process.terminate, self._process.kill)
            for step, ending in enumerate(endings if grace else endings[1:]):
                if ending is not None and self._process.returncode is None:
                    ending()
                if step == 0:
                    # After the SIGTERM of an unresponsive guest, not before: a guest that
                    # sees its socket close may exit on its own first.
                    self._close_socket()
                with trio.move_on_after(CLOSE_STEP_TIMEOUT):
                    await self._process.wait()
                if self._process.returncode is not None:
                    break
            self._output.close()

    def output_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the guest wrote to stdout/stderr."""
        if self._output.closed:
            return ""
        fd = self._output.fileno()
        size = os.fstat(fd).st_size
        chunk = os.pread(fd, min(size, 16384), max(0, size - 16384))
        return "\n".join(chunk.decode(errors="replace").splitlines()[-lines:])

    # -- requests ------------------------------------------------------------------

    async def attach(
        self, blocks: Sequence[MappedBlock], role: Role | str, *, timeout: float | None = None
    ) -> list[int]:
        """Hand the guest its RAM (the memfds go over SCM_RIGHTS; the guest maps them).

        Returns the address of each block's mapping in the guest. With role ``new`` the
        guest initialises the memory before answering; with ``postcopy`` it must be
        followed by :meth:`register_missing` before the guest touches memory.
        """
        role = Role(role)
        if len(blocks) > protocol.MAX_FDS:
            raise GuestError(f"at most {protocol.MAX_FDS} RAM blocks, got {len(blocks)}")
        ram_bytes = sum(block.spec.size for block in blocks)
        reply, _ = await self._request(
            Command.ATTACH,
            fds=[block.fd for block in blocks],
            timeout=self._ram_timeout(timeout, ram_bytes),
            blocks=[block.spec.to_json() for block in blocks],
            role=str(role),
        )
        self._ram_bytes = ram_bytes
        return self._addresses(Command.ATTACH, reply, len(blocks))

    async def register_missing(
        self, *, timeout: float | None = None
    ) -> tuple[Userfaultfd, list[int]]:
        """Have the guest (role postcopy) register its mappings for MISSING faults; returns
        the userfaultfd (ours to read and resolve faults on) and the mapping addresses.

        The guest keeps no copy: the registration lasts until we close the uffd."""
        return await self._uffd_request(Command.REGISTER_MISSING, timeout)

    async def unregister_missing(self, *, timeout: float | None = None) -> None:
        """Tell the guest postcopy is over (after closing the uffd of register_missing)."""
        await self._request(Command.UNREGISTER_MISSING, timeout=timeout)

    async def track_dirty(self, *, timeout: float | None = None) -> tuple[Userfaultfd, list[int]]:
        """Have the guest register its mappings in WP_ASYNC mode; returns the userfaultfd and
        the addresses. Read (and re-protect) written pages with a ``PagemapScanner(pid)``."""
        return await self._uffd_request(Command.TRACK_DIRTY, timeout)

    async def untrack_dirty(self, *, timeout: float | None = None) -> None:
        """Have the guest unregister and close its dirty-tracking userfaultfd."""
        await self._request(Command.UNTRACK_DIRTY, timeout=timeout)

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop the guest; when this returns its memory no longer changes."""
        await self._request(Command.STOP, timeout=timeout)
        self.running = False

    async def stop_and_save(self, *, timeout: float | None = None) -> bytes | None:
        """``stop`` and ``save_state`` in one round trip (the request's ``save-state``):
        the device state, or None from a guest that ignores that field (one written
        before it: ask ``save_state`` then). Raises GuestError if the save failed; the
        guest is stopped all the same."""
        fields: dict[str, Any] = {"save-state": True}
        reply, _ = await self._request(Command.STOP, timeout=timeout, **fields)
        self.running = False
        error = reply.get("state-error")
        if error is not None:
            raise GuestError(f"guest {self.pid} stopped but could not save its state: {error}")
        if "state" not in reply:
            return None
        try:
            return protocol.decode_state(reply["state"])
        except GuestError as error:
            raise GuestError(f"guest {self.pid} answered stop badly: {error}") from None

    async def cont(self, *, timeout: float | None = None) -> None:
        """Let the guest run."""
        await self._request(Command.CONT, timeout=timeout)
        self.running = True

    async def save_state(self, *, timeout: float | None = None) -> bytes:
        """The device state of the stopped guest."""
        reply, _ = await self._request(Command.SAVE_STATE, timeout=timeout)
        try:
            return protocol.decode_state(reply.get("state"))
        except GuestError as error:
            raise GuestError(f"guest {self.pid} answered save-state badly: {error}") from None

    async def load_state(
        self,
        state: bytes,
        *,
        timeout: float | None = None,
        progress: Callable[[], int] | None = None,
    ) -> None:
        """Give the stopped guest device state from a ``save_state``.

        A guest may check its memory while it loads (docs/guest-protocol.md), so the
        default deadline grows with its RAM, as attach's and verify's do. ``progress``
        (a postcopy destination's count of pages placed) makes the deadline count from
        the last time that count grew: a load that reads memory still arriving is
        waiting for it, not wedged, however long the stream takes to bring it."""
        await self._request(
            Command.LOAD_STATE,
            timeout=self._ram_timeout(timeout, self._ram_bytes),
            progress=progress,
            state=protocol.encode_state(state),
        )

    async def verify(self, *, timeout: float | None = None) -> Verdict:
        """Have the stopped guest check its memory against its invariant."""
        reply, _ = await self._request(
            Command.VERIFY, timeout=self._ram_timeout(timeout, self._ram_bytes)
        )
        verified = reply.get("verified")
        if not isinstance(verified, bool):
            raise GuestError(f"guest {self.pid} answered verify without a boolean 'verified'")
        return Verdict(verified, str(reply.get("detail", "")), reply)

    async def notify(self, event: Event | str, *, timeout: float | None = None) -> None:
        """Tell the guest about a migration event; once ``postcopy-start`` is answered the
        guest discards no RAM until ``postcopy-end``."""
        await self._request(Command.NOTIFY, timeout=timeout, event=str(Event(event)))

    async def query(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The guest's view of itself (running, role, blocks, uffd registrations)."""
        reply, _ = await self._request(Command.QUERY, timeout=timeout)
        return reply

    async def set_dirty_limit(self, bytes_per_second: int, *, timeout: float | None = None) -> None:
        """Ask the guest to dirty at most ``bytes_per_second`` (0: no limit; dirty-limit).
        GuestError if its program does not support a limit."""
        await self._request(Command.SET_DIRTY_LIMIT, timeout=timeout, rate=bytes_per_second)

    async def ping(self, *, timeout: float | None = None) -> None:
        await self._request(Command.PING, timeout=timeout)

    async def quit(self, *, timeout: float | None = None) -> int:
        """Ask the guest to exit and wait for it; returns its exit status."""
        await self._request(Command.QUIT, timeout=timeout)
        self._close_socket()
        with trio.move_on_after(self._timeout(timeout)) as scope:
            status = await self._process.wait()
        if scope.cancelled_caught:
            raise GuestError(f"guest {self.pid} answered quit but did not exit")
        return status

    # -- machinery -----------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.reply_timeout if timeout is None else timeout

    def _ram_timeout(self, timeout: float | None, ram_bytes: int) -> float:
        if timeout is not None:
            return timeout
        return self.reply_timeout + ram_bytes * SECONDS_PER_RAM_BYTE

    def _addresses(self, command: Command, reply: dict[str, Any], count: int) -> list[int]:
        addresses = reply.get("addresses")
        if (
            not isinstance(addresses, list)
            or len(addresses) != count
            or not all(isinstance(a, int) and a > 0 for a in addresses)
        ):
            raise GuestError(
                f"guest {self.pid} answered {command} without {count} mapping addresses: "
                f"{addresses!r}"
            )
        return addresses

    async def _uffd_request(
        self, command: Command, timeout: float | None
    ) -> tuple[Userfaultfd, list[int]]:
        reply, fds = await self._request(command, timeout=timeout, fds_expected=1)
        try:
            uffd = Userfaultfd.from_fd(fds[0])
        except Exception as error:
            protocol.close_fds(fds)
            raise GuestError(
                f"guest {self.pid} answered {command} with a bad fd: {error}"
            ) from None
        try:
            addresses = reply.get("addresses")
            if not isinstance(addresses, list):
                raise GuestError(f"guest {self.pid} answered {command} without addresses")
            return uffd, [int(a) for a in addresses]
        except BaseException:
            uffd.close()
            raise

    async def _request(
        self,
        command: Command,
        *,
        fds: Sequence[int] = (),
        timeout: float | None = None,
        fds_expected: int = 0,
        progress: Callable[[], int] | None = None,
        **fields: Any,
    ) -> tuple[dict[str, Any], list[int]]:
        """Send one request and wait for its reply; returns (reply, fds) with exactly
        ``fds_expected`` fds, which the caller then owns. With ``progress`` the deadline
        is ``timeout`` after the last change of ``progress()`` (polled)."""
        async with self._lock:
            if self._socket_closed:
                raise GuestError(f"guest {self.pid}: {command} after the guest was closed")
            self._next_id += 1
            request_id = self._next_id
            data = protocol.encode_message(protocol.request(command, request_id, **fields))
            sent_ns = time.monotonic_ns()
            try:
                await self._sock.sendmsg([data], protocol.ancillary_for(fds))
            except OSError as error:
                raise await self._dead(command, f"sending failed: {error}") from None
            limit = self._timeout(timeout)
            reply_fds: list[int] = []
            try:
                with trio.move_on_after(limit) as scope:
                    async with open_nursery() as watcher:
                        if progress is not None:
                            watcher.start_soon(_defer_while_progressing, scope, progress, limit)
                        reply, reply_fds = await self._reply_to(command, request_id)
                        watcher.cancel_scope.cancel()
            except BaseException:
                # Cancelled (or failed) after the reply came, e.g. at the nursery's exit:
                # the fds it carried are ours to close.
                protocol.close_fds(reply_fds)
                raise
            trace("guest_reply", cmd=command, us=(time.monotonic_ns() - sent_ns) // 1000)
            if scope.cancelled_caught:
                self._unresponsive = True
                since = " of the last progress of its memory" if progress is not None else ""
                raise GuestError(
                    f"guest {self.pid} did not answer {command} within {limit:g} s{since}"
                )
        if reply.get("ok") is not True:
            protocol.close_fds(reply_fds)
            raise GuestError(f"guest {self.pid} failed {command}: {reply.get('error')}")
        if len(reply_fds) != fds_expected:
            protocol.close_fds(reply_fds)
            raise GuestError(
                f"guest {self.pid} answered {command} with {len(reply_fds)} fds, "
                f"expected {fds_expected}"
            )
        return reply, reply_fds

    async def _reply_to(
        self, command: Command, request_id: int
    ) -> tuple[dict[str, Any], list[int]]:
        """Receive until the reply to ``request_id``; late replies are dropped (their fds
        closed)."""
        while True:
            received = await self._receive(command)
            if received is None:
                raise await self._dead(command, "it closed its control socket")
            reply, reply_fds = received
            if reply.get("reply") == request_id:
                self._unresponsive = False
                return reply, reply_fds
            protocol.close_fds(reply_fds)
            if reply.get("reply") is None:  # the guest could not parse a packet
                raise GuestError(
                    f"guest {self.pid} rejected a message during {command}: {reply.get('error')}"
                )
            # else: the late reply of an earlier, timed-out or cancelled request

    async def _receive(self, command: Command | str) -> tuple[dict[str, Any], list[int]] | None:
        try:
            data, ancdata, msg_flags, _ = await self._sock.recvmsg(
                protocol.MAX_MESSAGE_BYTES,
                protocol.ANCILLARY_BUFFER_SIZE,
                socket.MSG_CMSG_CLOEXEC,
            )
        except ConnectionError:
            return None
        if not data and not ancdata:
            return None
        try:
            return protocol.parse_received(data, ancdata, msg_flags)
        except GuestError as error:
            raise GuestError(f"guest {self.pid} during {command}: {error}") from None

    async def _receive_hello(self, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            received = await self._receive("hello")
        if scope.cancelled_caught:
            raise GuestError(
                f"guest {self.command} said no hello within {timeout:g} s; its output:\n"
                f"{self.output_tail()}"
            )
        if received is None:
            raise await self._dead("hello", "it closed its control socket before its hello")
        hello, fds = received
        protocol.close_fds(fds)
        if hello.get("hello") != protocol.PROTOCOL_VERSION:
            raise GuestError(
                f"guest {self.command} sent {hello!r} instead of a hello for protocol "
                f"version {protocol.PROTOCOL_VERSION}"
            )
        pid = hello.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise GuestError(f"guest {self.command} sent a hello without a valid pid: {hello!r}")
        self.pid = pid
        self._hello_received = True

    async def _dead(self, command: Command | str, what: str) -> GuestError:
        """The error for a guest that stopped talking: waits briefly for its exit status."""
        self._close_socket()
        with trio.move_on_after(CLOSE_STEP_TIMEOUT):
            await self._process.wait()
        ended = exit_status(self._process.returncode)
        tail = self.output_tail()
        return GuestError(
            f"guest {self.pid} ({' '.join(self.command)}) {ended} during {command}: {what}"
            + (f"; its last output:\n{tail}" if tail else "")
        )

    def _close_socket(self) -> None:
        if not self._socket_closed:
            self._socket_closed = True
            self._sock.close()


#: The longest the close of a guest may take (GuestProcess.aclose bounds each step).
GUEST_CLOSE_TIMEOUT = 10.0


async def close_guest(guest: GuestProcess | None, blocks: Iterable[MappedBlock]) -> None:
    """Close ``guest``'s process, then free ``blocks``, the RAM it mapped: the one
    sequence for the guest an engine, a migration or a departed guest leaves behind.
    Shielded and bounded; the blocks are freed even if the close timed out."""
    with trio.CancelScope(shield=True), trio.move_on_after(GUEST_CLOSE_TIMEOUT):
        if guest is not None:
            await guest.aclose()
    for block in blocks:
        block.close()


async def _defer_while_progressing(
    scope: trio.CancelScope, progress: Callable[[], int], limit: float
) -> None:
    """Keep ``scope``'s deadline ``limit`` seconds after the last change of ``progress()``."""
    last = progress()
    while True:
        await trio.sleep(PROGRESS_POLL)
        now = progress()
        if now != last:
            last = now
            scope.deadline = trio.current_time() + limit
