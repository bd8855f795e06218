"""Sans-io QMP framing: splitting a byte stream into JSON values, validating and encoding messages.

No trio and no sockets here (h11 style). Both directions are covered:

* :class:`JsonSplitter` turns received bytes into JSON values. QMP needs no newline between
  messages (``qemu.qmp`` sends none), so it tracks brackets and strings to find where each
  top-level value ends, across any split of the input into reads.
* :func:`parse_request` checks a value the server received the way QEMU's dispatcher does.
* :func:`parse_server_message` classifies what a client received (greeting, reply, event).
* :func:`encode_message` renders one message as ASCII JSON terminated by CRLF, as QEMU does.
"""

from __future__ import annotations

import enum
import json
import math
import re
from typing import Any, Final

import attrs

from ..errors import RemoteProtocolError, TrimigError

#: Error classes QEMU uses on QMP (``QapiErrorClass``).
GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"

#: Largest JSON message accepted; QMP control traffic is tiny, this only stops a runaway peer.
DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20
#: Deepest bracket nesting accepted (QEMU allows 1024; Python's json recursion is the real limit).
DEFAULT_MAX_DEPTH: Final = 512


class QmpError(TrimigError):
    """A QMP error reply: ``error_class`` (e.g. ``"GenericError"``) and the human ``desc``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class NeedData(enum.Enum):
    """Returned by :meth:`JsonSplitter.next_event` when more bytes are needed."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@attrs.frozen
class JsonValue:
    """One complete top-level JSON value (any JSON type)."""

    value: Any


@attrs.frozen
class JsonParseError:
    """Input that is not JSON. ``recoverable`` is False when the stream cannot be resynchronised
    (a message over the size limit); the connection should then be closed."""

    desc: str
    recoverable: bool = True


_WHITESPACE: Final = frozenset(b" \t\r\n")
_OPENERS: Final = {ord("{"): ord("}"), ord("["): ord("]")}
_CLOSERS: Final = frozenset(b"}]")
_QUOTES: Final = frozenset(b"\"'")
_SCALAR_DELIMITERS: Final = _WHITESPACE | frozenset(b"{}[]\"',:")
_BACKSLASH: Final = ord("\\")
# Bytes that matter inside a string / inside a container; everything else is skipped in bulk.
_STRING_SKIP: Final = re.compile(rb"[\"'\\\x00-\x1f\xfe\xff]")
_CONTAINER_SKIP: Final = re.compile(rb"[{}\[\]\"'\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]")


def _is_lexical_garbage(byte: int) -> bool:
    """Control characters other than tab/CR/LF, and 0xFE/0xFF, never appear in valid input.

    QMP clients send one of these to force the server's parser back to a known state.
    """
    return (byte < 0x20 and byte not in _WHITESPACE) or byte >= 0xFE


class JsonSplitter:
    """Incremental splitter of a stream of concatenated JSON values.

    ``receive_data(bytes)`` appends input; ``next_event()`` returns a :class:`JsonValue`, a
    :class:`JsonParseError` or :data:`NEED_DATA`. After a recoverable error the splitter has
    discarded the bad input and continues with the next value. ``receive_eof()`` turns a
    pending partial value into an error. Single-quoted strings (a QMP extension) are accepted.
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self._max_message_size = max_message_size
        self._max_depth = max_depth
        self._buffer = bytearray()
        self._eof = False
        self._reset_value()

    def _reset_value(self) -> None:
        self._pos = 0  # scan position in _buffer; the current value starts at 0
        self._started = False
        self._closers = bytearray()  # expected closing brackets, innermost last
        self._quote: int | None = None  # the quote of the string we are in
        self._escape = False
        self._scalar = False  # inside a bare top-level number/literal
        self._single_quoted = False

    def receive_data(self, data: bytes) -> None:
        """Append received bytes."""
        if self._eof:
            raise RuntimeError("receive_data after receive_eof")
        self._buffer += data

    def receive_eof(self) -> None:
        """The peer closed the stream; a partial value becomes an error."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a value."""
        return len(self._buffer)

    def next_event(self) -> JsonValue | JsonParseError | NeedData:
        """Return the next complete value, error, or NEED_DATA."""
        buffer = self._buffer
        while self._pos < len(buffer):
            if self._pos >= self._max_message_size:
                return self._fail(
                    f"JSON message exceeds {self._max_message_size} bytes", recoverable=False
                )
            skip = self._skip_pattern()
            if skip is not None:
                match = skip.search(buffer, self._pos)
                end = match.start() if match else len(buffer)
                if end != self._pos:
                    self._pos = end
                    continue
            byte = buffer[self._pos]
            if self._quote is not None:
                if self._escape:
                    self._escape = False
                elif byte == _BACKSLASH:
                    self._escape = True
                elif byte == self._quote:
                    self._quote = None
                    if not self._closers:  # a top-level string
                        return self._emit(self._pos + 1)
                elif byte < 0x20 or byte >= 0xFE:
                    return self._lexical_error(byte)
                self._pos += 1
                continue
            if _is_lexical_garbage(byte):
                return self._lexical_error(byte)
            if self._scalar:
                if byte in _SCALAR_DELIMITERS:
                    return self._emit(self._pos)
                self._pos += 1
                continue
            if not self._started:
                if byte in _WHITESPACE:
                    del buffer[0]  # skip whitespace between values
                    continue
                self._started = True
                if byte in _CLOSERS:
                    return self._stray(byte)
                if byte not in _OPENERS and byte not in _QUOTES:
                    self._scalar = True
            if byte in _OPENERS:
                if len(self._closers) >= self._max_depth:
                    return self._fail(
                        f"JSON parse error, nesting deeper than {self._max_depth} levels",
                        recoverable=False,
                    )
                self._closers.append(_OPENERS[byte])
            elif byte in _CLOSERS:
                if byte != self._closers[-1]:
                    return self._stray(byte)
                self._closers.pop()
                if not self._closers:
                    return self._emit(self._pos + 1)
            elif byte in _QUOTES:
                self._quote = byte
                self._single_quoted |= byte == ord("'")
            self._pos += 1
        if self._eof and buffer:
            if self._scalar:
                return self._emit(self._pos)
            return self._fail("JSON parse error, unexpected end of input")
        return NEED_DATA

    def _skip_pattern(self) -> re.Pattern[bytes] | None:
        if self._quote is not None:
            return None if self._escape else _STRING_SKIP
        return _CONTAINER_SKIP if self._closers else None

    def _emit(self, end: int) -> JsonValue | JsonParseError:
        raw = bytes(self._buffer[:end])
        single_quoted = self._single_quoted
        del self._buffer[:end]
        self._reset_value()
        return _decode_value(raw, single_quoted=single_quoted)

    def _fail(self, desc: str, *, recoverable: bool = True) -> JsonParseError:
        """Drop the value in progress (up to and including the current byte)."""
        del self._buffer[: self._pos + 1]
        self._reset_value()
        return JsonParseError(desc, recoverable=recoverable)

    def _lexical_error(self, byte: int) -> JsonParseError:
        return self._fail(f"JSON parse error, invalid character 0x{byte:02x}")

    def _stray(self, byte: int) -> JsonParseError:
        return self._fail(f"JSON parse error, stray '{chr(byte)}'")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_value(raw: bytes, *, single_quoted: bool) -> JsonValue | JsonParseError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return JsonParseError(f"JSON parse error, invalid UTF-8 at byte {exc.start}")
    if single_quoted:
        text = _single_to_double_quotes(text)
    try:
        return JsonValue(json.loads(text, parse_constant=_reject_constant))
    except json.JSONDecodeError as exc:
        return JsonParseError(f"JSON parse error, {exc.msg.lower()} at offset {exc.pos}")
    except (ValueError, RecursionError) as exc:
        return JsonParseError(f"JSON parse error, {exc}")


def _single_to_double_quotes(text: str) -> str:
    """Rewrite QMP's single-quoted strings as standard JSON strings (``\\'`` is a quote)."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        char = text[i]
        if quote is None:
            if char in "\"'":
                quote = char
                out.append('"')
            else:
                out.append(char)
        elif char == "\\":
            following = text[i + 1 : i + 2]
            out.append("'" if following == "'" else char + following)
            i += 1
        elif char == quote:
            quote = None
            out.append('"')
        elif char == '"':  # a bare double quote inside a single-quoted string
            out.append('\\"')
        else:
            out.append(char)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Server side: requests


@attrs.frozen
class Request:
    """A well-formed command request. ``has_id`` tells whether ``id`` (any JSON value) was sent."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


@attrs.frozen
class InvalidRequest:
    """A JSON value that is not a valid request; ``desc`` is QEMU's wording."""

    desc: str
    id: Any = None
    has_id: bool = False


_REQUEST_MEMBERS: Final = frozenset({"execute", "arguments", "id"})


def parse_request(value: Any) -> Request | InvalidRequest:
    """Validate a received JSON value as a QMP command (out-of-band execution is not offered).

    ``"execute"`` must be a string, ``"arguments"`` (optional) an object, ``"id"`` anything;
    any other member is an error. The id is echoed in errors whenever it could be read.
    """
    if not isinstance(value, dict):
        return InvalidRequest("QMP input must be a JSON object")
    has_id = "id" in value
    request_id = value.get("id")

    def invalid(desc: str) -> InvalidRequest:
        return InvalidRequest(desc, request_id, has_id)

    for member in value:
        if member not in _REQUEST_MEMBERS:
            return invalid(f"QMP input member '{member}' is unexpected")
    command = value.get("execute")
    if "execute" in value and not isinstance(command, str):
        return invalid("QMP input member 'execute' must be a string")
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return invalid("QMP input member 'arguments' must be an object")
    if command is None:
        return invalid("QMP input lacks member 'execute'")
    return Request(command, arguments, request_id, has_id)


# ---------------------------------------------------------------------------------------------
# Server messages


def greeting_message(version: dict[str, Any], capabilities: list[str]) -> dict[str, Any]:
    """``{"QMP": {"version": ..., "capabilities": [...]}}``."""
    return {"QMP": {"version": version, "capabilities": list(capabilities)}}


def return_message(result: Any, request_id: Any = None, *, has_id: bool = False) -> dict[str, Any]:
    """A success reply; ``id`` is present only when the request had one."""
    message: dict[str, Any] = {"return": result}
    if has_id:
        message["id"] = request_id
    return message


def error_message(
    error_class: str, desc: str, request_id: Any = None, *, has_id: bool = False
) -> dict[str, Any]:
    """An error reply; ``id`` is present only when the request had one."""
    message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        message["id"] = request_id
    return message


def event_message(name: str, data: dict[str, Any], timestamp: float) -> dict[str, Any]:
    """An asynchronous event; ``timestamp`` is seconds since the epoch (``-1`` if unknown).

    ``data`` is left out when empty, as QEMU does for events without members (STOP, RESUME).
    """
    if timestamp < 0:
        stamp = {"seconds": -1, "microseconds": -1}
    else:
        micros = round(timestamp * 1_000_000)
        stamp = {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000}
    message: dict[str, Any] = {"event": name}
    if data:
        message["data"] = data
    message["timestamp"] = stamp
    return message


def encode_message(message: dict[str, Any]) -> bytes:
    """Serialize one message: compact ASCII JSON on one line, terminated by CRLF."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\r\n"


# ---------------------------------------------------------------------------------------------
# Client side: what a server sends


@attrs.frozen
class Greeting:
    """The server greeting: ``version`` object and ``capabilities`` list."""

    version: dict[str, Any]
    capabilities: list[Any]


@attrs.frozen
class Reply:
    """A command reply. Exactly one of ``result`` (success) and ``error`` is meaningful:
    ``error`` is None on success, else a :class:`QmpError`."""

    id: Any
    has_id: bool
    result: Any = None
    error: QmpError | None = None


@attrs.frozen
class Event:
    """An asynchronous event; ``timestamp`` in seconds since the epoch (-1 when unknown)."""

    name: str
    data: dict[str, Any]
    timestamp: float


def parse_server_message(value: Any) -> Greeting | Reply | Event:
    """Classify a value sent by a QMP server; raises RemoteProtocolError naming what is wrong."""
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"QMP server sent a {type(value).__name__}, not an object")
    if "QMP" in value:
        body = value["QMP"]
        if not isinstance(body, dict):
            raise RemoteProtocolError("QMP greeting member 'QMP' is not an object")
        version, capabilities = body.get("version"), body.get("capabilities")
        if not isinstance(version, dict) or not isinstance(capabilities, list):
            raise RemoteProtocolError(
                "QMP greeting lacks a 'version' object or 'capabilities' list"
            )
        return Greeting(version, capabilities)
    if "event" in value:
        name, data = value["event"], value.get("data", {})
        if not isinstance(name, str) or not isinstance(data, dict):
            raise RemoteProtocolError(f"malformed QMP event: {value!r}")
        return Event(name, data, _parse_timestamp(value.get("timestamp")))
    has_id, request_id = "id" in value, value.get("id")
    if "return" in value:
        return Reply(request_id, has_id, result=value["return"])
    if "error" in value:
        error = value["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("class"), str)
            or not isinstance(error.get("desc"), str)
        ):
            raise RemoteProtocolError(f"malformed QMP error reply: {value!r}")
        return Reply(request_id, has_id, error=QmpError(error["class"], error["desc"]))
    raise RemoteProtocolError(f"QMP message is neither greeting, reply nor event: {value!r}")


def _parse_timestamp(stamp: Any) -> float:
    if not isinstance(stamp, dict):
        return -1.0
    seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int | float) or not isinstance(micros, int | float):
        return -1.0
    if seconds < 0:
        return -1.0
    value = seconds + micros / 1_000_000
    return value if math.isfinite(value) else -1.0
