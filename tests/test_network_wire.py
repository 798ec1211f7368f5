"""Wire messages of the bundle transfer protocol (protocol/wire.py): every malformed
request or response header is a WireError, never an exception of another type and
never a size outside what the reader allows."""

from __future__ import annotations

import json

import pytest

from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.wire import MAX_LINE, WireError, encode_header, encode_request, parse_header, parse_request

BUNDLE = "ab" * 32


def line(obj) -> bytes:
    return canonical_json(obj) + b"\n"


def test_requests_round_trip():
    assert parse_request(encode_request("bundle", BUNDLE)) == {"op": "bundle", "bundle": BUNDLE}
    assert parse_request(encode_request("chunk", BUNDLE, 2, 7)) == {"op": "chunk", "bundle": BUNDLE, "file": 2, "chunk": 7}
    assert encode_request("chunk", BUNDLE, 0, 0).endswith(b"\n") and encode_request("chunk", BUNDLE, 0, 0).count(b"\n") == 1
    assert parse_request(b'{"bundle": "%s", "op": "bundle"}\r\n' % BUNDLE.encode())["op"] == "bundle"  # whitespace is fine


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"not json\n", b"\xff\xfe\n", b"[]\n", b"null\n", b"42\n", b'"bundle"\n',
    b'{"op":"bundle"\n',  # truncated
    line({"op": "bundle"}),
    line({"op": "bundle", "bundle": None}),
    line({"op": "bundle", "bundle": 7}),
    line({"op": "bundle", "bundle": BUNDLE.upper()}),
    line({"op": "bundle", "bundle": BUNDLE[:-1]}),
    line({"op": "bundle", "bundle": "../" + BUNDLE[3:]}),
    line({"op": "bundle", "bundle": BUNDLE, "file": 0}),  # extra key
    line({"op": "list", "bundle": BUNDLE}),
    line({"op": None, "bundle": BUNDLE}),
    line({"bundle": BUNDLE}),
    line({"op": "chunk", "bundle": BUNDLE}),
    line({"op": "chunk", "bundle": BUNDLE, "file": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": 0, "chunk": 0, "x": 1}),
    line({"op": "chunk", "bundle": BUNDLE, "file": -1, "chunk": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": 0, "chunk": -3}),
    line({"op": "chunk", "bundle": BUNDLE, "file": True, "chunk": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": 0, "chunk": False}),
    line({"op": "chunk", "bundle": BUNDLE, "file": 0.0, "chunk": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": "0", "chunk": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": None, "chunk": 0}),
    line({"op": "chunk", "bundle": BUNDLE, "file": [0], "chunk": 0}),
    b'{"op":"chunk","bundle":"' + BUNDLE.encode() + b'","file":0,"chunk":NaN}\n',
    b'{"op":"chunk","bundle":"' + BUNDLE.encode() + b'","file":0,"chunk":1e400}\n',
], ids=lambda raw: raw[:48].decode("utf-8", "replace"))
def test_malformed_requests_are_wire_errors(raw):
    with pytest.raises(WireError):
        parse_request(raw)


def test_overlong_request_line_is_refused_before_parsing():
    padded = b'{"op":"bundle","bundle":"' + BUNDLE.encode() + b'"' + b" " * MAX_LINE + b"}\n"
    assert json.loads(padded)  # valid JSON, only too long
    with pytest.raises(WireError, match="too long"):
        parse_request(padded)
    deep = b"[" * 100_000 + b"]" * 100_000  # would blow the parser's recursion if it were parsed
    with pytest.raises(WireError, match="too long"):
        parse_request(deep)


def test_deeply_nested_short_messages_are_wire_errors():
    # Short enough to be parsed, deep enough to exhaust the JSON parser's recursion: the
    # server must answer it like any malformed request, not die with a RecursionError.
    nested = b"[" * 2000 + b"]" * 2000
    assert len(nested) < MAX_LINE
    with pytest.raises(WireError):
        parse_request(nested)
    with pytest.raises(WireError):
        parse_header(nested, 10)


def test_headers_round_trip():
    assert parse_header(encode_header(size=0), 10) == 0
    assert parse_header(encode_header(size=10), 10) == 10
    with pytest.raises(WireError, match="no such chunk"):
        parse_header(encode_header(error="no such chunk"), 10)


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"garbage\n", b"\xff\n", b"[]\n", b"null\n", b"1\n",
    line({}), line({"ok": False}), line({"ok": "true", "size": 1}), line({"ok": 1, "size": 1}),
    line({"ok": True}), line({"ok": True, "size": None}), line({"ok": True, "size": -1}),
    line({"ok": True, "size": 11}),  # more than the reader allows
    line({"ok": True, "size": 2 ** 70}), line({"ok": True, "size": True}), line({"ok": True, "size": 1.0}),
    line({"ok": True, "size": "5"}),
    b'{"ok":true,"size":NaN}\n', b'{"ok":true,"size":Infinity}\n',
], ids=lambda raw: raw[:40].decode("utf-8", "replace"))
def test_malformed_or_refusing_headers_are_wire_errors(raw):
    with pytest.raises(WireError):
        parse_header(raw, 10)
