"""The guest protocol's messages: one UTF-8 JSON object per SOCK_SEQPACKET packet.

Sans-io except for the two small blocking helpers the guest library uses
(:func:`send_message`, :func:`receive_message`); the engine side sends and receives
the same bytes through trio. ``docs/guest-protocol.md`` is the full description.

Message shapes:

* guest → engine, once, first: ``{"hello": 1, "pid": N}``
* engine → guest request: ``{"cmd": NAME, "id": N, ...fields}`` (+ fds, SCM_RIGHTS)
* guest → engine reply: ``{"reply": N, "ok": true, ...fields}`` (+ fds) or
  ``{"reply": N, "ok": false, "error": TEXT}``
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import socket
from collections.abc import Sequence
from typing import Any

from ..errors import GuestError, LocalProtocolError
from ..kernel import fdpass
from ..kernel.fdpass import close_fds as close_fds  # the guest library and the engine use it

PROTOCOL_VERSION = 1
#: The environment variable naming the guest's end of the socketpair.
ENV_FD = "TRIMIG_GUEST_FD"
#: The largest packet either side sends or accepts, in bytes of JSON.
MAX_MESSAGE_BYTES = 64 * 1024
#: The most fds one message may carry (the kernel's SCM_MAX_FD).
MAX_FDS = fdpass.SCM_MAX_FD

ANCILLARY_BUFFER_SIZE = fdpass.ancillary_size(MAX_FDS)


class Role(enum.StrEnum):
    """What the memory handed over by ``attach`` holds."""

    NEW = "new"  # fresh zeroed memfds: the guest initialises them
    INCOMING = "incoming"  # the migrated contents, complete
    POSTCOPY = "postcopy"  # partly missing: do not touch before register-missing


class Command(enum.StrEnum):
    """Every request the engine may send."""

    ATTACH = "attach"
    REGISTER_MISSING = "register-missing"
    UNREGISTER_MISSING = "unregister-missing"
    TRACK_DIRTY = "track-dirty"
    UNTRACK_DIRTY = "untrack-dirty"
    STOP = "stop"
    CONT = "cont"
    SAVE_STATE = "save-state"
    LOAD_STATE = "load-state"
    VERIFY = "verify"
    NOTIFY = "notify"
    QUERY = "query"
    PING = "ping"
    QUIT = "quit"
    SET_DIRTY_LIMIT = "set-dirty-limit"


class Event(enum.StrEnum):
    """Notifications carried by the ``notify`` command."""

    POSTCOPY_START = "postcopy-start"  # from now on the guest must not discard RAM
    POSTCOPY_END = "postcopy-end"  # discarding RAM is allowed again


def encode_message(message: dict[str, Any]) -> bytes:
    """Encode one message as compact UTF-8 JSON; raises LocalProtocolError if it is too big."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        what = message.get("cmd", message.get("reply", "?"))
        raise LocalProtocolError(
            f"guest protocol message {what!r} is {len(data)} bytes, "
            f"more than the limit of {MAX_MESSAGE_BYTES}"
        )
    return data


def decode_message(data: bytes) -> dict[str, Any]:
    """Decode one packet; raises GuestError naming what was wrong with it."""
    if not data:
        raise GuestError("guest protocol: empty packet")
    try:
        message = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise GuestError(
            f"guest protocol: packet is not UTF-8 JSON ({error}): {data[:80]!r}"
        ) from None
    if not isinstance(message, dict):
        raise GuestError(f"guest protocol: packet is not a JSON object: {data[:80]!r}")
    return message


def request(command: Command | str, request_id: int, **fields: Any) -> dict[str, Any]:
    """Build a request message."""
    return {"cmd": str(command), "id": request_id, **fields}


def reply_ok(request_id: int | None, **fields: Any) -> dict[str, Any]:
    """Build a successful reply."""
    return {"reply": request_id, "ok": True, **fields}


def reply_error(request_id: int | None, error: str) -> dict[str, Any]:
    """Build a failed reply."""
    return {"reply": request_id, "ok": False, "error": error}


def encode_state(state: bytes) -> str:
    """Device state travels as base64 text inside the JSON."""
    return base64.b64encode(state).decode("ascii")


def decode_state(text: Any) -> bytes:
    """Inverse of :func:`encode_state`; raises GuestError on anything but valid base64 text."""
    if not isinstance(text, str):
        raise GuestError(f"device state must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise GuestError(f"device state is not valid base64: {error}") from None


def _check_fd_count(fds: Sequence[int]) -> Sequence[int]:
    if len(fds) > MAX_FDS:
        raise LocalProtocolError(f"a guest protocol message can carry at most {MAX_FDS} fds")
    return fds


def ancillary_for(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The sendmsg ancillary data carrying ``fds`` with SCM_RIGHTS (empty list for none)."""
    return fdpass.rights(_check_fd_count(fds))


def parse_received(
    data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int
) -> tuple[dict[str, Any], list[int]]:
    """Turn one ``recvmsg`` result into (message, fds); the caller then owns the fds.

    Raises GuestError for a truncated packet, truncated ancillary data or bad JSON,
    after closing any fds that arrived with it.
    """
    return _check_received(data, fdpass.take_fds(ancdata), msg_flags)


def _check_received(
    data: bytes, fds: list[int], msg_flags: int
) -> tuple[dict[str, Any], list[int]]:
    try:
        if msg_flags & socket.MSG_TRUNC:
            raise GuestError(
                f"guest protocol: packet longer than the limit of {MAX_MESSAGE_BYTES} bytes"
            )
        if msg_flags & socket.MSG_CTRUNC:
            raise GuestError(f"guest protocol: more than {MAX_FDS} fds in one packet")
        return decode_message(data), fds
    except BaseException:
        close_fds(fds)
        raise


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Blocking send of one message (+ fds) on a SOCK_SEQPACKET socket."""
    fdpass.send_fds(sock, [encode_message(message)], _check_fd_count(fds))


def receive_message(
    sock: socket.socket, *, flags: int = 0
) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one message and its fds (close-on-exec); None at end of file.

    With ``flags=socket.MSG_DONTWAIT`` raises BlockingIOError when nothing is queued.
    """
    data, fds, msg_flags = fdpass.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS, flags=flags)
    if not data and not fds:
        return None
    return _check_received(data, fds, msg_flags)
