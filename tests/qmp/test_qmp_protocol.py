"""Sans-io QMP framing: the JSON splitter, request validation, message encoding."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimig.errors import RemoteProtocolError
from trimig.qmp.protocol import (
    NEED_DATA,
    Event,
    Greeting,
    InvalidRequest,
    JsonParseError,
    JsonSplitter,
    JsonValue,
    Reply,
    Request,
    encode_message,
    error_message,
    event_message,
    parse_request,
    parse_server_message,
    return_message,
)


def split_all(chunks: list[bytes], *, eof: bool = False, **kwargs: Any) -> list[Any]:
    splitter = JsonSplitter(**kwargs)
    out: list[Any] = []
    for chunk in chunks:
        splitter.receive_data(chunk)
        while (item := splitter.next_event()) is not NEED_DATA:
            out.append(item)
    if eof:
        splitter.receive_eof()
        while (item := splitter.next_event()) is not NEED_DATA:
            out.append(item)
    return out


STREAM = (
    b'{"execute": "qmp_capabilities"}{"execute":"query-status","id":7}\r\n'
    b'  {"a": "}{[\\"]", "b": [1, {"c": []}]}\n'
    b"[1,2] 42 -3.5e2 \"str\" true null {'k': 'it\\'s \"x\"'}"
)
EXPECTED = [
    {"execute": "qmp_capabilities"},
    {"execute": "query-status", "id": 7},
    {"a": '}{["]', "b": [1, {"c": []}]},
    [1, 2],
    42,
    -350.0,
    "str",
    True,
    None,
    {"k": 'it\'s "x"'},
]


def test_splitter_handles_every_split_point() -> None:
    whole = split_all([STREAM], eof=True)
    assert whole == [JsonValue(value) for value in EXPECTED]
    for cut in range(1, len(STREAM)):
        assert split_all([STREAM[:cut], STREAM[cut:]], eof=True) == whole, cut
    assert split_all([bytes([b]) for b in STREAM], eof=True) == whole


def test_splitter_waits_for_more_and_does_not_guess() -> None:
    splitter = JsonSplitter()
    splitter.receive_data(b'{"execute": "stop"')
    assert splitter.next_event() is NEED_DATA
    splitter.receive_data(b"  ")
    assert splitter.next_event() is NEED_DATA
    splitter.receive_data(b"}")
    assert splitter.next_event() == JsonValue({"execute": "stop"})
    assert splitter.next_event() is NEED_DATA
    # A bare number is only complete once a delimiter follows.
    splitter.receive_data(b"12")
    assert splitter.next_event() is NEED_DATA
    splitter.receive_data(b"3 ")
    assert splitter.next_event() == JsonValue(123)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"}", "stray '}'"),
        (b"]", "stray ']'"),
        (b'{"a": [1}', "stray '}'"),
        (b'{"a": 1,}', "JSON parse error"),
        (b"{\x01", "invalid character 0x01"),
        (b'{"a\x02', "invalid character 0x02"),
        (b"\xff", "invalid character 0xff"),
        (b'{"a": NaN}', "JSON parse error"),
        (b'{"a": "\xc3\x28"}', "invalid UTF-8"),
        (b"nul ", "JSON parse error"),
    ],
)
def test_splitter_reports_bad_input_and_recovers(data: bytes, message: str) -> None:
    items = split_all([data + b' {"execute": "cont"}'])
    errors = [item for item in items if isinstance(item, JsonParseError)]
    assert errors and message in errors[0].desc and errors[0].recoverable
    assert items[-1] == JsonValue({"execute": "cont"})


def test_control_character_resets_a_half_message() -> None:
    # qmp-spec: a control character forces the parser back to a known-good state.
    items = split_all([b'{"execute": "sto', b"\x1b", b'{"execute": "stop"}'])
    assert isinstance(items[0], JsonParseError)
    assert items[1:] == [JsonValue({"execute": "stop"})]


def test_truncated_message_at_eof_is_an_error() -> None:
    items = split_all([b'{"execute": "st'], eof=True)
    assert len(items) == 1 and isinstance(items[0], JsonParseError)
    assert "end of input" in items[0].desc
    assert split_all([b"  \r\n"], eof=True) == []
    assert split_all([b"17"], eof=True) == [JsonValue(17)]


def test_oversized_and_overdeep_messages_are_fatal() -> None:
    items = split_all([b'{"a": "' + b"x" * 200 + b'"}'], max_message_size=100)
    assert isinstance(items[0], JsonParseError) and not items[0].recoverable
    assert "exceeds 100 bytes" in items[0].desc
    items = split_all([b"[" * 20], max_depth=10)
    assert isinstance(items[0], JsonParseError) and not items[0].recoverable
    assert "nesting" in items[0].desc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=5),
    separators=st.lists(st.sampled_from(["", " ", "\n", "\r\n", "\t "]), min_size=5, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
    ascii_only=st.booleans(),
)
def test_splitter_roundtrips_any_objects_any_chunking(
    values: list[dict[str, Any]], separators: list[str], cuts: list[int], ascii_only: bool
) -> None:
    text = "".join(
        json.dumps(value, ensure_ascii=ascii_only) + separators[i] for i, value in enumerate(values)
    )
    data = text.encode()
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    assert split_all(chunks, eof=True) == [JsonValue(value) for value in values]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"execute": "stop"}, Request("stop", {})),
        (
            {"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": [1, "x"]},
            Request("migrate", {"uri": "tcp:h:1"}, [1, "x"], True),
        ),
        ({"execute": "stop", "id": None}, Request("stop", {}, None, True)),
        ([1], InvalidRequest("QMP input must be a JSON object")),
        ({"id": 3}, InvalidRequest("QMP input lacks member 'execute'", 3, True)),
        (
            {"execute": 1, "id": "a"},
            InvalidRequest("QMP input member 'execute' must be a string", "a", True),
        ),
        (
            {"execute": "stop", "arguments": [], "id": 1},
            InvalidRequest("QMP input member 'arguments' must be an object", 1, True),
        ),
        ({"execute": "stop", "extra": 1}, InvalidRequest("QMP input member 'extra' is unexpected")),
        (
            {"exec-oob": "migrate-pause"},
            InvalidRequest("QMP input member 'exec-oob' is unexpected"),
        ),
    ],
)
def test_parse_request(value: Any, expected: Request | InvalidRequest) -> None:
    assert parse_request(value) == expected


def test_encoding_is_one_ascii_line_ending_in_crlf() -> None:
    data = encode_message(return_message({"text": "é\nx"}, 5, has_id=True))
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"return": {"text": "é\nx"}, "id": 5}
    data.decode("ascii")
    assert json.loads(encode_message(return_message({}))) == {"return": {}}
    assert json.loads(encode_message(error_message("GenericError", "bad", None, has_id=True))) == {
        "error": {"class": "GenericError", "desc": "bad"},
        "id": None,
    }


def test_event_message_timestamp_and_empty_data() -> None:
    message = event_message("MIGRATION", {"status": "active"}, 1700000000.25)
    assert message == {
        "event": "MIGRATION",
        "data": {"status": "active"},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }
    assert "data" not in event_message("STOP", {}, 1.0)
    assert event_message("STOP", {}, -1)["timestamp"] == {"seconds": -1, "microseconds": -1}


def test_parse_server_messages() -> None:
    greeting = parse_server_message({"QMP": {"version": {"qemu": {}}, "capabilities": ["oob"]}})
    assert greeting == Greeting({"qemu": {}}, ["oob"])
    reply = parse_server_message({"return": [1], "id": "x"})
    assert reply == Reply("x", True, result=[1])
    error = parse_server_message({"error": {"class": "CommandNotFound", "desc": "d"}})
    assert isinstance(error, Reply) and error.error is not None
    assert (error.error.error_class, error.error.desc, error.has_id) == (
        "CommandNotFound",
        "d",
        False,
    )
    event = parse_server_message(
        {"event": "STOP", "timestamp": {"seconds": 10, "microseconds": 500000}}
    )
    assert event == Event("STOP", {}, 10.5)
    for bad in ([], {"QMP": []}, {"error": {"class": 1}}, {"what": 1}, {"event": 3}):
        with pytest.raises(RemoteProtocolError):
            parse_server_message(bad)
