"""The exception hierarchy of trimig.

Every error trimig raises on purpose is a :class:`TrimigError`. The branches tell
who is at fault: we (``LocalProtocolError``), the peer (``RemoteProtocolError``),
the kernel (``KernelError``), the link (``TransportError``), the guest
(``GuestError``) or the caller's input (``ConfigError``). :func:`forget_locals` drops
the frame locals of an error that is kept (they may pin views of guest RAM);
:func:`exit_status` words how a child process ended.
"""

from __future__ import annotations

import signal
import traceback


class TrimigError(Exception):
    """Base class of every error trimig raises on purpose."""


class ConfigError(TrimigError, ValueError):
    """A bad argument, URI, size, capability or parameter given by the user."""


class ProtocolError(TrimigError):
    """The migration stream or return path broke its rules."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug or misuse on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: corrupt, truncated or out of order."""


class KernelError(TrimigError, OSError):
    """A system call failed. ``errno`` and ``strerror`` are those of the call."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        import os

        message = f"{operation} failed: {os.strerror(errno)}"
        if detail:
            message += f" ({detail})"
        OSError.__init__(self, errno, message)
        self.operation = operation

    def __str__(self) -> str:
        return str(self.strerror)


class MissingKernelFeature(TrimigError):
    """The running kernel lacks a feature this operation needs; ``feature`` names it."""

    def __init__(self, feature: str, needed_for: str = "") -> None:
        message = f"kernel feature {feature} is not available"
        if needed_for:
            message += f"; it is needed for {needed_for}"
        super().__init__(message)
        self.feature = feature


class TransportError(TrimigError):
    """The connection failed: refused, reset, closed early or timed out."""


class GuestError(TrimigError):
    """The guest process misbehaved: it died, broke the guest protocol or failed a request."""


class MigrationFailed(TrimigError):
    """A migration ended in the ``failed`` state; ``__cause__`` holds the reason."""


class MigrationPaused(TrimigError):
    """Postcopy broke after the guest started on the destination: both sides are paused.

    Neither side holds the whole guest, so nothing is resumed or thrown away; the
    received bitmap is kept for a later recovery.
    """


def forget_locals(exc: BaseException) -> None:
    """Clear the finished frames in the tracebacks of ``exc`` and its causes (they stay
    printable): their locals include gather lists, views of guest RAM, which a caller
    holding the error (or a channel keeping the error of its failed send) would
    otherwise pin, so the guest's blocks could not be unmapped."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        pending.extend(getattr(error, "exceptions", ()))


def exit_status(returncode: int | None) -> str:
    """How a child process ended, for an error message: "is still running", "was killed
    by SIGKILL", "exited with status 1" (``returncode`` as subprocess reports it)."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"
