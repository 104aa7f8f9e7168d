"""Frame codec: header layout, payload codecs and the FrameReader's reassembly of a byte stream."""

from __future__ import annotations

import struct

import pytest

from fluidity.wire import frames
from fluidity.wire.frames import (
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_HOST_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_WINDOW,
    ErrorCode,
    FrameReader,
    FrameType,
    ProtocolError,
)

Frame = tuple[int, int, int, bytes]


def as_tuples(decoded: list[tuple[int, int, int, memoryview]]) -> list[Frame]:
    return [(t, f, s, bytes(p)) for t, f, s, p in decoded]


def read_in_pieces(data: bytes, sizes: list[int], reader: FrameReader | None = None) -> list[Frame]:
    """Feed ``data`` to a reader in pieces of the given sizes (the rest in one last piece)."""
    reader = reader or FrameReader()
    out: list[Frame] = []
    pos = 0
    for size in sizes:
        out += as_tuples(reader.feed(data[pos : pos + size]))
        pos += size
    out += as_tuples(reader.feed(data[pos:]))
    assert reader.buffered == 0
    return out


# --- header --------------------------------------------------------------------------------------


def test_header_is_length_type_flags_stream_id_big_endian() -> None:
    encoded = frames.encode(FrameType.DATA, frames.FLAG_END_STREAM, 0x01020304, b"abc")
    assert HEADER_SIZE == 10
    assert encoded == b"\x00\x00\x00\x03" + b"\x03" + b"\x01" + b"\x01\x02\x03\x04" + b"abc"
    assert frames.header(FrameType.WINDOW, 0, 7, 4) == b"\x00\x00\x00\x04\x04\x00\x00\x00\x00\x07"


def test_frame_type_numbers_are_fixed() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0,
        "OPEN": 1,
        "OPEN_RESULT": 2,
        "DATA": 3,
        "WINDOW": 4,
        "RESET": 5,
        "PING": 6,
        "GOAWAY": 7,
        "FRAME_SIZE": 8,
    }


@pytest.mark.parametrize("size", [1024, 16 * 1024, frames.MAX_FRAME_PAYLOAD])
def test_frame_size_round_trips(size: int) -> None:
    assert frames.parse_frame_size(frames.frame_size_payload(size)) == size


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x00\x00\x04", "3 bytes, expected 4"),
        ((1023).to_bytes(4, "big"), "out of range"),
        ((frames.MAX_FRAME_PAYLOAD + 1).to_bytes(4, "big"), "out of range"),
    ],
)
def test_malformed_frame_size_is_a_protocol_error(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        frames.parse_frame_size(payload)


def test_error_code_numbers_are_fixed() -> None:
    assert [(c.name, int(c)) for c in ErrorCode] == [
        ("OK", 0),
        ("REFUSED", 1),
        ("DNS_FAILURE", 2),
        ("TIMEOUT", 3),
        ("DENIED", 4),
        ("LIMIT", 5),
        ("UNREACHABLE", 6),
        ("INTERNAL", 7),
        ("PROTOCOL_ERROR", 8),
        ("CANCELLED", 9),
        ("GOING_AWAY", 10),
        ("FLOW_CONTROL", 11),
        ("CONNECTION_LOST", 12),
    ]


@pytest.mark.parametrize("value", [13, 99, 255])
def test_unknown_error_code_reads_as_internal(value: int) -> None:
    assert ErrorCode.parse(value) is ErrorCode.INTERNAL


def test_protocol_error_defaults_to_protocol_error_code() -> None:
    assert ProtocolError("x").code is ErrorCode.PROTOCOL_ERROR
    assert ProtocolError("x", ErrorCode.FLOW_CONTROL).code is ErrorCode.FLOW_CONTROL


# --- HELLO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "window", "max_frame"),
    [(1, 256 * 1024, 64 * 1024), (0, 1, 1024), (65535, MAX_WINDOW, MAX_FRAME_PAYLOAD)],
)
def test_hello_round_trips(version: int, window: int, max_frame: int) -> None:
    payload = frames.hello_payload(version, window, max_frame)
    assert len(payload) == 10
    assert frames.parse_hello(payload) == (version, window, max_frame)


def test_hello_layout_is_version_window_max_frame() -> None:
    assert frames.hello_payload(1, 0x10000, 0x4000) == bytes.fromhex("00010001000000004000")


def test_hello_trailing_bytes_are_ignored() -> None:
    payload = frames.hello_payload(1, 4096, 2048) + b"future extension"
    assert frames.parse_hello(memoryview(payload)) == (1, 4096, 2048)


@pytest.mark.parametrize("size", range(10))
def test_short_hello_is_a_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError, match="HELLO payload"):
        frames.parse_hello(frames.hello_payload(1, 4096, 2048)[:size])


@pytest.mark.parametrize("window", [0, MAX_WINDOW + 1, 0xFFFFFFFF])
def test_hello_window_out_of_range_is_a_protocol_error(window: int) -> None:
    with pytest.raises(ProtocolError, match="initial window"):
        frames.parse_hello(struct.pack("!HII", 1, window, 2048))


@pytest.mark.parametrize("max_frame", [0, 1023, MAX_FRAME_PAYLOAD + 1])
def test_hello_max_frame_out_of_range_is_a_protocol_error(max_frame: int) -> None:
    with pytest.raises(ProtocolError, match="max frame size"):
        frames.parse_hello(struct.pack("!HII", 1, 4096, max_frame))


# --- OPEN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("example.com", 443),
        ("10.0.0.1", 1),
        ("::1", 65535),
        ("a", 80),
        ("h" * MAX_HOST_LENGTH, 8080),
    ],
)
def test_open_round_trips(host: str, port: int) -> None:
    payload = frames.open_payload(host, port)
    assert payload[:2] == port.to_bytes(2, "big")
    assert payload[2:] == host.encode("ascii")
    assert frames.parse_open(payload) == (host, port)


def test_open_encodes_international_names_as_idna() -> None:
    payload = frames.open_payload("bücher.de", 443)
    assert frames.parse_open(payload) == ("xn--bcher-kva.de", 443)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("", 80),
        ("h" * (MAX_HOST_LENGTH + 1), 80),
        ("example.com", 0),
        ("example.com", 65536),
        ("example.com", -1),
        ("bad host", 80),
        ("tab\there", 80),
        ("nul\x00", 80),
        ("del\x7f", 80),
        ("newline\n.ü", 80),
    ],
)
def test_open_payload_refuses_targets_the_peer_would_reject(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        frames.open_payload(host, port)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x50", id="port-without-host"),
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(b"\x00\x00example.com", id="port-0"),
        pytest.param(b"\x00\x50b\xc3\xbccher.de", id="utf8-host"),
        pytest.param(b"\x00\x50\xff", id="high-byte"),
        pytest.param(b"\x00\x50bad host", id="space"),
        pytest.param(b"\x00\x50bad\r\nhost", id="crlf"),
        pytest.param(b"\x00\x50nul\x00", id="nul"),
        pytest.param(b"\x00\x50" + b"h" * (MAX_HOST_LENGTH + 1), id="host-too-long"),
    ],
)
def test_malformed_open_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="OPEN"):
        frames.parse_open(payload)


# --- OPEN_RESULT and RESET (code + message) ------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_code_payload_round_trips_every_code(code: ErrorCode) -> None:
    payload = frames.code_payload(code, f"because {code.name}")
    assert payload[0] == int(code)
    assert frames.parse_code(payload) == (code, f"because {code.name}")


def test_code_payload_without_message_is_one_byte() -> None:
    assert frames.code_payload(ErrorCode.REFUSED) == b"\x01"
    assert frames.parse_code(b"\x01") == (ErrorCode.REFUSED, "")


def test_code_message_is_utf8() -> None:
    payload = frames.code_payload(ErrorCode.DENIED, "accès refusé ✋")
    assert payload[1:] == "accès refusé ✋".encode()
    assert frames.parse_code(payload) == (ErrorCode.DENIED, "accès refusé ✋")


def test_long_message_is_truncated_on_a_character_boundary() -> None:
    message = "a" + "é" * 400  # 801 bytes; byte 512 falls inside an "é"
    payload = frames.code_payload(ErrorCode.INTERNAL, message)
    assert len(payload) == 1 + 511
    code, text = frames.parse_code(payload)
    assert code is ErrorCode.INTERNAL
    assert text == "a" + "é" * 255


def test_received_message_is_cut_at_limit_and_invalid_utf8_replaced() -> None:
    code, text = frames.parse_code(b"\x07" + b"\xff" + b"x" * 1000)
    assert code is ErrorCode.INTERNAL
    assert text == "\ufffd" + "x" * (MAX_MESSAGE_LENGTH - 1)


def test_result_without_code_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="without a code"):
        frames.parse_code(b"")


def test_unknown_result_code_reads_as_internal() -> None:
    assert frames.parse_code(b"\xc8oops") == (ErrorCode.INTERNAL, "oops")


# --- WINDOW --------------------------------------------------------------------------------------


@pytest.mark.parametrize("increment", [1, 4096, MAX_WINDOW])
def test_window_round_trips(increment: int) -> None:
    payload = frames.window_payload(increment)
    assert payload == increment.to_bytes(4, "big")
    assert frames.parse_window(payload) == increment


@pytest.mark.parametrize("increment", [0, MAX_WINDOW + 1, 0xFFFFFFFF])
def test_window_increment_out_of_range_is_a_flow_control_error(increment: int) -> None:
    with pytest.raises(ProtocolError, match="increment") as caught:
        frames.parse_window(struct.pack("!I", increment))
    assert caught.value.code is ErrorCode.FLOW_CONTROL


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_of_wrong_size_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="expected 4") as caught:
        frames.parse_window(payload)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


# --- GOAWAY --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "code", "message"),
    [
        (0, ErrorCode.GOING_AWAY, ""),
        (17, ErrorCode.PROTOCOL_ERROR, "DATA before HELLO"),
        (0xFFFFFFFF, ErrorCode.FLOW_CONTROL, "ünïcode"),
    ],
)
def test_goaway_round_trips(last: int, code: ErrorCode, message: str) -> None:
    payload = frames.goaway_payload(last, code, message)
    assert payload[:5] == last.to_bytes(4, "big") + bytes([code])
    assert frames.parse_goaway(payload) == (last, code, message)


@pytest.mark.parametrize("size", range(5))
def test_short_goaway_is_a_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError, match="GOAWAY"):
        frames.parse_goaway(frames.goaway_payload(3, ErrorCode.GOING_AWAY)[:size])


def test_goaway_with_unknown_code_reads_as_internal() -> None:
    assert frames.parse_goaway(b"\x00\x00\x00\x02\xfebye") == (2, ErrorCode.INTERNAL, "bye")


# --- FrameReader ---------------------------------------------------------------------------------

STREAM = b"".join(
    [
        frames.encode(FrameType.HELLO, 0, 0, frames.hello_payload(1, 4096, 2048)),
        frames.encode(FrameType.OPEN, 0, 1, frames.open_payload("example.com", 443)),
        frames.encode(FrameType.DATA, 0, 1, b"GET / HTTP/1.1\r\n\r\n"),
        frames.encode(FrameType.DATA, frames.FLAG_END_STREAM, 1, b""),
        frames.encode(FrameType.PING, frames.FLAG_ACK, 0, b"12345678"),
        frames.encode(FrameType.WINDOW, 0, 1, frames.window_payload(1024)),
        frames.encode(0xEE, 0xFF, 0xFFFFFFFF, b"unknown type"),
        frames.encode(FrameType.DATA, 0, 2, b""),
    ]
)
EXPECTED: list[Frame] = [
    (0, 0, 0, frames.hello_payload(1, 4096, 2048)),
    (1, 0, 1, b"\x01\xbbexample.com"),
    (3, 0, 1, b"GET / HTTP/1.1\r\n\r\n"),
    (3, 1, 1, b""),
    (6, 1, 0, b"12345678"),
    (4, 0, 1, b"\x00\x00\x04\x00"),
    (0xEE, 0xFF, 0xFFFFFFFF, b"unknown type"),
    (3, 0, 2, b""),
]


def test_reader_returns_many_frames_from_one_feed() -> None:
    assert read_in_pieces(STREAM, []) == EXPECTED


def test_reader_handles_one_byte_feeds() -> None:
    reader = FrameReader()
    out: list[Frame] = []
    for i in range(len(STREAM)):
        out += as_tuples(reader.feed(STREAM[i : i + 1]))
    assert out == EXPECTED
    assert reader.buffered == 0


def test_reader_handles_every_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        assert read_in_pieces(STREAM, [cut]) == EXPECTED, cut


def test_reader_handles_every_pair_of_split_points() -> None:
    for first in range(0, len(STREAM) + 1, 3):
        for second in range(len(STREAM) - first + 1):
            assert read_in_pieces(STREAM, [first, second]) == EXPECTED, (first, second)


@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
def test_reader_joins_a_header_split_across_feeds(split: int) -> None:
    frame = frames.encode(FrameType.DATA, 0, 9, b"payload")
    reader = FrameReader()
    assert reader.feed(frame[:split]) == []
    assert reader.buffered == split
    assert as_tuples(reader.feed(frame[split:])) == [(3, 0, 9, b"payload")]
    assert reader.buffered == 0


def test_reader_returns_zero_length_frames_at_once() -> None:
    empty = frames.encode(FrameType.DATA, frames.FLAG_END_STREAM, 4, b"")
    reader = FrameReader()
    assert as_tuples(reader.feed(empty)) == [(3, 1, 4, b"")]
    assert as_tuples(reader.feed(empty * 3)) == [(3, 1, 4, b"")] * 3
    # A zero-length frame whose header completes in a later feed is returned by that feed.
    assert reader.feed(empty[:4]) == []
    assert as_tuples(reader.feed(empty[4:])) == [(3, 1, 4, b"")]
    assert reader.buffered == 0


def test_reader_finishes_a_buffered_frame_then_reads_the_rest_of_the_feed() -> None:
    first = frames.encode(FrameType.DATA, 0, 1, b"x" * 100)
    second = frames.encode(FrameType.DATA, 0, 2, b"y" * 5)
    reader = FrameReader()
    assert reader.feed(first[:50]) == []
    assert reader.buffered == 50
    frames_out = as_tuples(reader.feed(first[50:] + second + second[:3]))
    assert frames_out == [(3, 0, 1, b"x" * 100), (3, 0, 2, b"y" * 5)]
    assert reader.buffered == 3


def test_reader_ignores_empty_feeds() -> None:
    reader = FrameReader()
    assert reader.feed(b"") == []
    reader.feed(STREAM[:15])
    assert reader.feed(b"") == []
    assert reader.buffered == 15
    assert read_in_pieces(STREAM[15:], [], reader)[0] == EXPECTED[0]


def test_reader_payloads_of_whole_frames_are_views_of_the_fed_bytes() -> None:
    data = frames.encode(FrameType.DATA, 0, 1, b"abc") + frames.encode(FrameType.DATA, 0, 2, b"de")
    decoded = FrameReader().feed(data)
    assert [p.obj for _, _, _, p in decoded] == [data, data]


def test_reader_accepts_a_frame_of_exactly_the_limit() -> None:
    reader = FrameReader(max_payload=1024)
    frame = frames.encode(FrameType.DATA, 0, 1, b"z" * 1024)
    assert as_tuples(reader.feed(frame)) == [(3, 0, 1, b"z" * 1024)]


def test_oversize_frame_is_rejected_as_soon_as_its_header_is_seen() -> None:
    header = frames.header(FrameType.DATA, 0, 1, 1025)
    reader = FrameReader(max_payload=1024)
    with pytest.raises(ProtocolError, match="1025 bytes exceeds the limit of 1024") as caught:
        reader.feed(header)  # no payload byte has arrived yet
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


def test_oversize_header_fed_byte_by_byte_is_rejected_on_its_last_byte() -> None:
    header = frames.header(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1)
    reader = FrameReader()
    for byte in header[:-1]:
        assert reader.feed(bytes([byte])) == []
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(header[-1:])


def test_oversize_header_completed_from_buffer_is_rejected() -> None:
    header = frames.header(FrameType.DATA, 0, 1, 0xFFFFFFFF)
    reader = FrameReader()
    assert reader.feed(header[:6]) == []
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(header[6:])


def test_oversize_frame_after_a_valid_one_in_the_same_feed_is_rejected() -> None:
    good = frames.encode(FrameType.PING, 0, 0, b"12345678")
    bad = frames.header(FrameType.DATA, 0, 1, 2000)
    with pytest.raises(ProtocolError):
        FrameReader(max_payload=1024).feed(good + bad + b"x" * 3)


def test_reader_buffer_holds_at_most_one_partial_frame() -> None:
    frame = frames.encode(FrameType.DATA, 0, 1, b"q" * 1024)
    reader = FrameReader(max_payload=1024)
    reader.feed(frame * 3 + frame[:-1])
    assert reader.buffered == len(frame) - 1 == HEADER_SIZE + 1024 - 1
