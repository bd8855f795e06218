"""The exception hierarchy of trimig.

Every error trimig raises on purpose is a :class:`TrimigError`. The branches tell
who is at fault: we (``LocalProtocolError``), the peer (``RemoteProtocolError``),
the kernel (``KernelError``), the link (``TransportError``), the guest
(``GuestError``) or the caller's input (``ConfigError``).
"""

from __future__ import annotations


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
