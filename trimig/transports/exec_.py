"""The ``exec:COMMAND`` transport: a pipe to or from ``sh -c COMMAND``.

Outgoing (connect) the stream goes to the command's stdin; incoming (listen/accept) it is
read from the command's stdout. So ``exec:cat > FILE`` saves a migration stream and
``exec:cat FILE`` restores it. There is no return path.

Lifetime of the child (run in its own process group, so a whole pipeline is killed):

* outgoing: ``send_eof()`` closes the pipe and waits for the command to exit; a non-zero
  status raises TransportError. Call it to finish: ``aclose()`` without it aborts.
* incoming: ``receive_into()`` waits for the command to exit when it sees EOF; a non-zero
  status raises TransportError instead of returning 0.
* ``aclose()`` closes the pipe, SIGKILLs the group of a command that is still running and
  reaps it. The command's stderr is captured (in a memfd) and quoted in errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
from collections.abc import Sequence

import trio

from trimig.errors import TransportError, exit_status
from trimig.kernel.iov import GatherItem, readv
from trimig.transports.base import (
    ListenerBase,
    RegionRegistry,
    check_receive_buffer,
    transport_error,
    write_gather,
)
from trimig.transports.uri import ExecCommand

PIPE_SIZE = 1024 * 1024
"""Pipe capacity asked for (F_SETPIPE_SZ; capped by /proc/sys/fs/pipe-max-size)."""

REAP_TIMEOUT = 5.0
"""Seconds cleanup waits for a killed command to be reaped."""

EXIT_GRACE = 5.0
"""Seconds we wait for a command that closed its stdin early to exit, before killing it."""

STDERR_TAIL = 1000

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Child:
    """The ``sh -c`` process behind an exec stream, with its captured stderr."""

    def __init__(self, process: trio.Process, command: str, stderr_fd: int) -> None:
        self.process = process
        self.command = command
        self._stderr_fd = stderr_fd

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the command's whole process group unless it has been reaped."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def wait(self) -> int:
        return await self.process.wait()

    async def reap(self) -> None:
        """Kill (if still running) and reap, shielded and time-bounded; close the stderr memfd."""
        try:
            self.kill()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + REAP_TIMEOUT):
                await self.process.wait()
        finally:
            if self._stderr_fd >= 0:
                os.close(self._stderr_fd)
                self._stderr_fd = -1

    def failure(self, what: str) -> TransportError:
        """A TransportError for the (reaped) command: ``what`` then its status and stderr."""
        status = exit_status(self.process.returncode)
        message = f"exec command {self.command!r} {what}: it {status}"
        stderr = self._stderr_tail()
        if stderr:
            message += f"; its stderr ends with: {stderr}"
        return TransportError(message)

    def _stderr_tail(self) -> str:
        if self._stderr_fd < 0:
            return ""
        size = os.fstat(self._stderr_fd).st_size
        data = os.pread(self._stderr_fd, STDERR_TAIL, max(0, size - STDERR_TAIL))
        return data.decode(errors="replace").strip()


async def _spawn(command: str, *, stdin: int, stdout: int) -> _Child:
    stderr_fd = os.memfd_create("trimig-exec-stderr", os.MFD_CLOEXEC)
    try:
        process = await trio.lowlevel.open_process(
            ["sh", "-c", command], stdin=stdin, stdout=stdout, stderr=stderr_fd, process_group=0
        )
    except OSError as error:
        os.close(stderr_fd)
        raise transport_error(f"starting exec command {command!r}", error) from error
    except BaseException:
        os.close(stderr_fd)
        raise
    return _Child(process, command, stderr_fd)


def _nonblocking_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


class PipeStream:
    """A one-way ByteStream over a pipe to (``sending``) or from an exec command."""

    transport = "exec"
    has_return_path = False
    regions: RegionRegistry | None = None

    def __init__(self, child: _Child, fd: int, *, sending: bool) -> None:
        os.set_blocking(fd, False)
        self._child = child
        self._fd = fd
        self._sending = sending
        self._finished = False  # send_eof() or EOF completed with status 0
        self._uri = ExecCommand(child.command).uri

    @property
    def pid(self) -> int:
        """The process id of the ``sh -c`` child (also its process group id)."""
        return self._child.process.pid

    async def send_buffers(self, buffers: Sequence[GatherItem]) -> None:
        if not self._sending:
            raise TransportError(f"{self._uri} was opened for incoming data; it cannot send")
        if self._fd < 0:
            raise TransportError(f"sending on {self._uri} after send_eof() or aclose()")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await write_gather(self._fd, buffers)
        except BrokenPipeError as error:
            raise await self._early_exit("stopped reading the stream") from error
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"sending on {self._uri}", error) from error
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _early_exit(self, what: str) -> TransportError:
        """Wait (bounded) for a command that stopped reading to exit; describe how it ended."""
        with trio.move_on_after(EXIT_GRACE):
            await self._child.wait()
        return self._child.failure(what)

    async def receive_into(self, buffer: memoryview) -> int:
        if self._sending:
            raise TransportError(
                f"{self._uri} was opened for outgoing data; exec has no return path"
            )
        check_receive_buffer(buffer)
        if self._fd < 0:
            raise TransportError(f"receiving on {self._uri} after aclose()")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            while (count := readv(self._fd, [buffer])) is None:
                await trio.lowlevel.wait_readable(self._fd)
        except (OSError, trio.ClosedResourceError) as error:
            raise transport_error(f"receiving on {self._uri}", error) from error
        if count == 0 and not self._finished:
            if await self._child.wait() != 0:
                raise self._child.failure("failed")
            self._finished = True
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def send_eof(self) -> None:
        """Outgoing: close the pipe, wait for the command to exit, raise if it failed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._sending or self._finished:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._close_fd()
        if await self._child.wait() != 0:
            raise self._child.failure("failed")
        self._finished = True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def aclose(self) -> None:
        """Close the pipe; kill the command unless it already finished; reap it."""
        self._close_fd()
        await self._child.reap()
        await trio.lowlevel.checkpoint()


async def _start(command: str, *, sending: bool) -> PipeStream:
    """Start ``sh -c command`` with a pipe to its stdin (``sending``) or from its stdout;
    the other standard stream is /dev/null."""
    read_end, write_end = _nonblocking_pipe()
    ours, theirs = (write_end, read_end) if sending else (read_end, write_end)
    try:
        if sending:
            child = await _spawn(command, stdin=theirs, stdout=subprocess.DEVNULL)
        else:
            child = await _spawn(command, stdin=subprocess.DEVNULL, stdout=theirs)
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    return PipeStream(child, ours, sending=sending)


async def connect_exec(address: ExecCommand) -> PipeStream:
    """Start ``sh -c COMMAND`` and return a stream writing to its stdin."""
    return await _start(address.command, sending=True)


class ExecListener(ListenerBase):
    """Incoming exec: each accept() starts the command and reads its stdout."""

    def __init__(self, address: ExecCommand) -> None:
        self._address = address

    @property
    def address(self) -> ExecCommand:
        return self._address

    async def accept(self) -> PipeStream:
        return await _start(self._address.command, sending=False)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def listen_exec(address: ExecCommand) -> ExecListener:
    await trio.lowlevel.checkpoint()
    return ExecListener(address)
