"""The library a guest program uses to be migrated by trimig (``trimig.guest`` re-exports it).

A guest is a program in its own process. The engine spawns it with one end of a
``SOCK_SEQPACKET`` socketpair (fd number in ``$TRIMIG_GUEST_FD``), hands it its RAM
as memfds and controls it with the requests of ``docs/guest-protocol.md``. This
module does the protocol; the program supplies a :class:`GuestProgram`::

    class MyProgram(GuestProgram):
        def on_attach(self, guest, role): ...        # memory is mapped: guest.blocks
        def step(self): ...                           # one small unit of work
        def save_state(self): return b"..."
        def load_state(self, state): ...

    raise SystemExit(Guest.connect().run(MyProgram()))

:meth:`Guest.run` calls ``step()`` while the guest runs and services control
messages between steps (so ``stop`` is honoured as soon as the current step ends),
and blocks on the control socket while the guest is paused. Keep steps short
(milliseconds). On a postcopy destination any memory access may block in the
kernel until the engine places the page; that is expected.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from collections.abc import Mapping as ReadOnlyMapping
from typing import Any, Final

import attrs
import numpy as np

from ..errors import ConfigError, GuestError, TrimigError
from ..kernel.memory import punch_hole
from ..kernel.uffd import Feature, Mode, Userfaultfd
from ..ram_blocks import MappedBlock, RamBlockSpec
from . import protocol
from .protocol import Command, Event, Role


class GuestRequestError(GuestError):
    """Raised by a hook to fail the current request; its text becomes the reply's error."""


@attrs.frozen
class VerifyResult:
    """What ``verify`` answers: ``fields`` are added to the reply as they are."""

    verified: bool
    detail: str
    fields: dict[str, Any] = attrs.field(factory=dict)


class GuestBlock(MappedBlock):
    """One RAM block as the guest sees it: the memfd it received and its own mapping."""

    def __init__(self, spec: RamBlockSpec, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < spec.size:
            raise GuestRequestError(
                f"memfd of block {spec.name!r} is {size} bytes, smaller than the block's "
                f"{spec.size}"
            )
        super().__init__(spec, fd)

    def array(self, dtype: Any = np.uint8) -> np.ndarray:
        """The block's memory as a 1-D numpy view of ``dtype`` (no copy)."""
        return np.frombuffer(self.mapping.buffer, dtype=dtype)


class GuestProgram:
    """The hooks a guest program overrides; every default does nothing.

    A hook raising an exception fails the request that called it (the reply carries
    ``"ok": false`` and the exception's text); the guest keeps going.
    """

    def on_attach(self, guest: Guest, role: Role) -> None:
        """Memory is mapped (``guest.blocks``). With ``Role.NEW`` initialise it here.

        With ``Role.POSTCOPY`` do not touch memory: pages still missing would be
        filled with zeros before the engine can register them.
        """

    def step(self) -> float | None:
        """Do one unit of work (milliseconds at most) while the guest runs.

        Return how long to idle (seconds) before the next step, or None for no pause;
        control messages arriving meanwhile are serviced at once.
        """
        return 0.1

    def on_stop(self) -> None:
        """The guest has been stopped (memory is quiescent until ``on_cont``)."""

    def on_cont(self) -> None:
        """The guest is about to run; raise to refuse (it stays paused)."""

    def save_state(self) -> bytes:
        """The device state of the paused guest (small: it travels in one JSON packet)."""
        return b""

    def load_state(self, state: bytes) -> None:
        """Apply device state saved by a ``save_state`` (the guest stays paused)."""

    def verify(self) -> VerifyResult:
        """Check memory against the program's invariant while paused."""
        return VerifyResult(True, "this guest program has no invariant to check")

    def on_notify(self, event: Event) -> None:
        """A migration event (``postcopy-start``/``postcopy-end``) arrived."""

    def set_dirty_limit(self, bytes_per_second: int) -> bool:
        """Dirty at most ``bytes_per_second`` from now on (0: no limit; the engine's
        dirty-limit). Return False if the program cannot (the default): the request fails."""
        return False

    def dirty_limit_throttle_us(self) -> int:
        """Microseconds spent waiting for the dirty limit so far (in ``query``'s reply)."""
        return 0


class Guest:
    """The guest's end of the control socket and the state the protocol gives it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.role: Role | None = None
        self.blocks: tuple[GuestBlock, ...] = ()
        #: True between ``cont`` and ``stop``.
        self.running = False
        self._discard_inhibited = False
        # The MISSING uffd is only the engine's (the guest closes its copy once sent).
        self._missing_registered = False
        self._close_after_reply: list[Userfaultfd] = []
        self._dirty_uffd: Userfaultfd | None = None
        self._quit = False
        #: Monotonic ns of the last cont and of the start and end of the first step after
        #: it (``query``'s ``x-first-step``: what a restore's time to first step is).
        self._cont_ns = 0
        self._first_step: tuple[int, int] | None = None
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    @classmethod
    def connect(cls, fd: int | None = None) -> Guest:
        """Adopt the control socket (default: ``$TRIMIG_GUEST_FD``) and say hello."""
        if fd is None:
            text = os.environ.get(protocol.ENV_FD)
            if text is None:
                raise ConfigError(
                    f"${protocol.ENV_FD} is not set: this program must be started by the "
                    "trimig engine"
                )
            try:
                fd = int(text)
            except ValueError:
                raise ConfigError(f"${protocol.ENV_FD}={text!r} is not an fd number") from None
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise ConfigError(f"${protocol.ENV_FD}: fd {fd} is not a socket ({error})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise ConfigError(f"fd {fd} is not an AF_UNIX SOCK_SEQPACKET socket")
        os.set_inheritable(fd, False)
        os.environ.pop(protocol.ENV_FD, None)
        guest = cls(sock)
        protocol.send_message(sock, {"hello": protocol.PROTOCOL_VERSION, "pid": os.getpid()})
        return guest

    # -- what a program asks --------------------------------------------------

    def ram_discard_inhibited(self) -> bool:
        """True between ``postcopy-start`` and ``postcopy-end``: never discard RAM then."""
        return self._discard_inhibited

    def discard_ram(self, block: GuestBlock, offset: int, length: int) -> bool:
        """Give ``[offset, offset + length)`` of ``block`` back (it reads as zeros after).

        Returns False, doing nothing, while discarding is inhibited (postcopy).
        """
        if self._discard_inhibited:
            return False
        if offset < 0 or length <= 0 or offset + length > block.size:
            raise ConfigError(
                f"discard_ram: range {offset:#x}+{length:#x} is outside block "
                f"{block.name!r} of {block.size:#x} bytes"
            )
        punch_hole(block.fd, offset, length)
        return True

    # -- the main loop ----------------------------------------------------------

    def run(self, program: GuestProgram) -> int:
        """Run ``program`` until ``quit`` or until the engine goes away; returns 0."""
        while not self._quit:
            timeout: float | None = None
            if self.running:
                first = self._first_step is None
                started = time.monotonic_ns() if first else 0
                timeout = program.step() or 0.0
                if first:
                    self._first_step = (started, time.monotonic_ns())
            if not self.serve(program, timeout):
                break
        return 0

    def serve(self, program: GuestProgram, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for control messages and handle
        every queued one. Returns False once the engine has gone away or sent ``quit``."""
        if not self._poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return True
        while not self._quit:
            try:
                received = protocol.receive_message(self._sock, flags=socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except ConnectionError:
                return False
            except GuestError as error:  # a malformed packet: answer it, carry on
                print(f"trimig guest: {error}", file=sys.stderr)
                protocol.send_message(self._sock, protocol.reply_error(None, str(error)))
                continue
            if received is None:
                return False
            self._handle(program, *received)
        return False

    def close(self) -> None:
        """Release the userfaultfds and the socket (mappings stay until process exit)."""
        if self._dirty_uffd is not None:
            self._dirty_uffd.close()
        self._dirty_uffd = None
        self._sock.close()

    # -- requests ---------------------------------------------------------------

    def _handle(self, program: GuestProgram, message: dict[str, Any], fds: list[int]) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            protocol.close_fds(fds)
            self._reply(protocol.reply_error(None, f"request without an integer id: {message}"))
            return
        try:
            command = Command(str(message.get("cmd")))
        except ValueError:
            protocol.close_fds(fds)
            self._reply(protocol.reply_error(request_id, f"unknown command {message.get('cmd')!r}"))
            return
        spec = COMMANDS[command]
        request = _Request(program, message, fds, [])
        try:
            try:
                if fds and not spec.takes_fds:
                    protocol.close_fds(fds)
                    raise GuestRequestError(f"{command} carries no fds, got {len(fds)}")
                if spec.needs is not _Needs.NOTHING:
                    self._require_attached(command)
                if spec.needs is _Needs.PAUSED and self.running:
                    raise GuestRequestError("the guest is running; stop it first")
                fields = spec.handler(self, request)
            except Exception as error:
                if not isinstance(error, TrimigError):
                    traceback.print_exc()
                self._reply(protocol.reply_error(request_id, f"{command}: {error}"))
                return
            self._reply(protocol.reply_ok(request_id, **fields), request.reply_fds)
        finally:
            while self._close_after_reply:
                self._close_after_reply.pop().close()
        if command is Command.QUIT:
            self._quit = True

    def _reply(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            protocol.send_message(self._sock, message, fds)
        except (BrokenPipeError, ConnectionError):
            self._quit = True

    # -- the handlers of COMMANDS -------------------------------------------------------------

    def _nothing(self, request: _Request) -> dict[str, Any]:
        return {}

    def _query(self, request: _Request) -> dict[str, Any]:
        return {
            "running": self.running,
            "role": None if self.role is None else str(self.role),
            "blocks": [block.spec.to_json() for block in self.blocks],
            "discard_inhibited": self._discard_inhibited,
            "missing_registered": self._missing_registered,
            "dirty_tracked": self._dirty_uffd is not None,
            "dirty-limit-throttle-us": request.program.dirty_limit_throttle_us(),
            "x-first-step": None
            if self._first_step is None
            else {
                "cont-ns": self._cont_ns,
                "start-ns": self._first_step[0],
                "end-ns": self._first_step[1],
            },
        }

    def _attach(self, request: _Request) -> dict[str, Any]:
        message, fds = request.message, request.fds
        try:
            if self.blocks:
                raise GuestRequestError("memory is already attached")
            try:
                role = Role(str(message.get("role")))
            except ValueError:
                raise GuestRequestError(
                    f"unknown role {message.get('role')!r}; expected one of "
                    f"{[str(r) for r in Role]}"
                ) from None
            raw_blocks = message.get("blocks")
            if not isinstance(raw_blocks, list) or not raw_blocks:
                raise GuestRequestError("'blocks' must be a non-empty list")
            if len(fds) != len(raw_blocks):
                raise GuestRequestError(
                    f"{len(raw_blocks)} blocks but {len(fds)} memfds came with the message"
                )
            specs = [_block_spec(raw) for raw in raw_blocks]
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise GuestRequestError(f"block names are not unique: {names}")
        except BaseException:
            protocol.close_fds(fds)
            raise
        blocks: list[GuestBlock] = []
        try:
            for spec, fd in zip(specs, fds, strict=True):
                blocks.append(GuestBlock(spec, fd))
        except BaseException:
            for block in blocks:
                block.close()
            protocol.close_fds(fds[len(blocks) :])
            raise
        self.blocks = tuple(blocks)
        self.role = role
        request.program.on_attach(self, role)
        return {"addresses": self._addresses()}

    def _notify(self, request: _Request) -> dict[str, Any]:
        raw_event = request.message.get("event")
        try:
            event = Event(str(raw_event))
        except ValueError:
            raise GuestRequestError(
                f"unknown event {raw_event!r}; expected one of {[str(e) for e in Event]}"
            ) from None
        if event is Event.POSTCOPY_START:
            self._discard_inhibited = True
        elif event is Event.POSTCOPY_END:
            self._discard_inhibited = False
        request.program.on_notify(event)
        return {"discard_inhibited": self._discard_inhibited}

    def _cont(self, request: _Request) -> dict[str, Any]:
        if not self.running:
            request.program.on_cont()
            self.running = True
            self._cont_ns = time.monotonic_ns()
            self._first_step = None
        return {"running": True}

    def _set_dirty_limit(self, request: _Request) -> dict[str, Any]:
        limit = request.message.get("rate")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise GuestRequestError(f"rate must be an integer >= 0 (bytes/s), got {limit!r}")
        if not request.program.set_dirty_limit(limit):
            raise GuestRequestError("this guest program does not support a dirty limit")
        return {}

    def _stop(self, request: _Request) -> dict[str, Any]:
        """Stop; with ``save-state: true`` also save the device state into the reply (one
        round trip for a switch-over). A failed save leaves the guest stopped: its error
        goes in ``state-error``."""
        if self.running:
            self.running = False
            request.program.on_stop()
        fields: dict[str, Any] = {"running": False}
        if request.message.get("save-state") is True:
            try:
                fields["state"] = protocol.encode_state(request.program.save_state())
            except Exception as error:
                if not isinstance(error, TrimigError):
                    traceback.print_exc()
                fields["state-error"] = f"save-state: {error}"
        return fields

    def _register_missing(self, request: _Request) -> dict[str, Any]:
        """Register for MISSING faults. The guest's own copy of the uffd is closed once the
        reply is sent: the registration then ends when the engine closes its copy, so a
        guest blocked on a fault is woken if the engine goes away instead of hanging."""
        if self._missing_registered:
            raise GuestRequestError("the mappings are already registered for missing pages")
        if self._dirty_uffd is not None:
            raise GuestRequestError("dirty tracking is on; untrack-dirty first")
        if self.role is not Role.POSTCOPY:
            raise GuestRequestError(f"register-missing needs role 'postcopy', not {self.role}")
        uffd = register_blocks(self.blocks, Mode.MISSING)
        self._close_after_reply.append(uffd)
        self._missing_registered = True
        return self._registered(request, uffd, Mode.MISSING)

    def _unregister_missing(self, request: _Request) -> dict[str, Any]:
        self._missing_registered = False
        return {}

    def _track_dirty(self, request: _Request) -> dict[str, Any]:
        if self._dirty_uffd is not None:
            raise GuestRequestError("dirty tracking is already on")
        if self._missing_registered:
            raise GuestRequestError("the mappings are registered for missing pages (postcopy)")
        self._dirty_uffd = register_blocks(self.blocks, Mode.WP)
        return self._registered(request, self._dirty_uffd, Mode.WP)

    def _untrack_dirty(self, request: _Request) -> dict[str, Any]:
        uffd, self._dirty_uffd = self._dirty_uffd, None
        if uffd is not None:
            try:
                for block in self.blocks:
                    uffd.unregister(block.address, block.size)
            finally:
                uffd.close()
        return {}

    def _save_state(self, request: _Request) -> dict[str, Any]:
        return {"state": protocol.encode_state(request.program.save_state())}

    def _load_state(self, request: _Request) -> dict[str, Any]:
        request.program.load_state(protocol.decode_state(request.message.get("state")))
        return {}

    def _verify(self, request: _Request) -> dict[str, Any]:
        result = request.program.verify()
        return {**result.fields, "verified": result.verified, "detail": result.detail}

    # -- their helpers --------------------------------------------------------------------------

    def _require_attached(self, command: Command) -> None:
        if not self.blocks:
            raise GuestRequestError(f"{command} needs memory: send attach first")

    def _addresses(self) -> list[int]:
        return [block.address for block in self.blocks]

    def _registered(self, request: _Request, uffd: Userfaultfd, mode: Mode) -> dict[str, Any]:
        """The reply to a registration: the uffd goes with it."""
        request.reply_fds.append(uffd.fileno())
        return {"addresses": self._addresses(), "features": int(uffd_features(self.blocks, mode))}


@attrs.frozen
class _Request:
    """One request as its handler sees it; the handler appends the fds its reply carries."""

    program: GuestProgram
    message: dict[str, Any]
    fds: list[int]
    reply_fds: list[int]


class _Needs(enum.Enum):
    """What a command needs of the guest before its handler runs."""

    NOTHING = enum.auto()
    MEMORY = enum.auto()  # attached
    PAUSED = enum.auto()  # attached and stopped


@attrs.frozen
class CommandSpec:
    """How the guest serves one command: its handler, what it needs, whether it takes fds."""

    handler: Callable[[Guest, _Request], dict[str, Any]]
    needs: _Needs = _Needs.NOTHING
    takes_fds: bool = False


COMMANDS: Final[ReadOnlyMapping[Command, CommandSpec]] = {
    Command.PING: CommandSpec(Guest._nothing),
    Command.QUIT: CommandSpec(Guest._nothing),
    Command.QUERY: CommandSpec(Guest._query),
    Command.ATTACH: CommandSpec(Guest._attach, takes_fds=True),
    Command.NOTIFY: CommandSpec(Guest._notify),
    Command.CONT: CommandSpec(Guest._cont, _Needs.MEMORY),
    Command.STOP: CommandSpec(Guest._stop, _Needs.MEMORY),
    Command.SET_DIRTY_LIMIT: CommandSpec(Guest._set_dirty_limit),
    Command.REGISTER_MISSING: CommandSpec(Guest._register_missing, _Needs.MEMORY),
    Command.UNREGISTER_MISSING: CommandSpec(Guest._unregister_missing, _Needs.MEMORY),
    Command.TRACK_DIRTY: CommandSpec(Guest._track_dirty, _Needs.MEMORY),
    Command.UNTRACK_DIRTY: CommandSpec(Guest._untrack_dirty, _Needs.MEMORY),
    Command.SAVE_STATE: CommandSpec(Guest._save_state, _Needs.PAUSED),
    Command.LOAD_STATE: CommandSpec(Guest._load_state, _Needs.PAUSED),
    Command.VERIFY: CommandSpec(Guest._verify, _Needs.PAUSED),
}
"""Every guest protocol command and how the guest library serves it."""


def uffd_features(blocks: Sequence[GuestBlock], mode: Mode) -> Feature:
    """The userfaultfd features ``mode`` needs for ``blocks`` (memfd-backed, maybe hugetlb)."""
    hugetlb = any(block.spec.hugetlb for block in blocks)
    if mode is Mode.MISSING:
        features = Feature.MISSING_SHMEM
        if hugetlb:
            features |= Feature.MISSING_HUGETLBFS
        return features
    if mode is Mode.WP:
        # WP_HUGETLBFS_SHMEM is what says write-protection works on shmem at all.
        return Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM
    raise ConfigError(f"no feature set for userfaultfd mode {mode!r}")


def register_blocks(blocks: Sequence[GuestBlock], mode: Mode) -> Userfaultfd:
    """Create a userfaultfd, do the API handshake for ``mode`` and register every block."""
    uffd = Userfaultfd.create(nonblocking=True)
    try:
        uffd.api(uffd_features(blocks, mode))
        for block in blocks:
            uffd.register(block.address, block.size, mode)
    except BaseException:
        uffd.close()
        raise
    return uffd


def _block_spec(raw: Any) -> RamBlockSpec:
    if not isinstance(raw, dict):
        raise GuestRequestError(f"a block must be a JSON object, got {raw!r}")
    try:
        return RamBlockSpec.from_json(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise GuestRequestError(f"bad block {raw!r}: {error}") from None
