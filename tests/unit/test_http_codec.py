"""The llhttp-based message readers and writers, without sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluidity.agent.http_codec import (
    CLOSED,
    END,
    LAST_CHUNK,
    NEED_DATA,
    Event,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    request_head,
    response_head,
)


def requests(max_request_line: int = 8192, max_headers: int = 100, max_bytes: int = 65536):
    return RequestReader(max_request_line, max_headers, max_bytes)


def drain(reader: RequestReader | ResponseReader) -> list[Event]:
    events = []
    while (event := reader.next_event()) is not NEED_DATA:
        events.append(event)
        if event is CLOSED:
            break
    return events


def test_pipelined_requests_queue_behind_the_first_with_split_targets_joined() -> None:
    reader = requests()
    reader.receive_data(b"GET http://a.test/x")
    assert reader.next_event() is NEED_DATA
    assert reader.started
    reader.receive_data(
        b"yz HTTP/1.1\r\nHost:  a.test  \r\nX-Case: 1\r\n\r\n"
        b"POST http://b.test/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    )
    first, end1, second, body, end2 = drain(reader)
    assert isinstance(first, RequestHead)
    assert (first.method, first.target, first.http_version) == (b"GET", b"http://a.test/xyz", "1.1")
    assert first.raw_headers == [(b"Host", b"a.test"), (b"X-Case", b"1")]
    assert first.headers == [(b"host", b"a.test"), (b"x-case", b"1")]
    assert first.keep_alive and not first.upgrade
    assert end1 is END and end2 is END
    assert isinstance(second, RequestHead) and second.method == b"POST"
    assert body == b"abc"
    assert reader.idle


def test_connect_stops_parsing_and_keeps_the_tunnel_bytes() -> None:
    reader = requests()
    reader.receive_data(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n\x16\x03\x01")
    reader.receive_data(b"more")
    head, end = drain(reader)
    assert isinstance(head, RequestHead) and head.upgrade and end is END
    assert reader.trailing_data == (b"\x16\x03\x01more", False)
    reader.receive_eof()
    assert reader.trailing_data == (b"\x16\x03\x01more", True)


def test_refused_upgrade_goes_back_to_parsing_what_followed() -> None:
    reader = requests()
    reader.receive_data(
        b"GET http://a.test/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET http://a.test/next HTTP/1.1\r\nHost: a.test\r\n\r\n"
    )
    head, end = drain(reader)
    assert isinstance(head, RequestHead) and head.upgrade and end is END
    reader.start_next_cycle()
    again, end = drain(reader)
    assert isinstance(again, RequestHead) and again.target == b"http://a.test/next"
    assert reader.trailing_data == (b"", False)


def test_http_1_0_requests_and_connection_close_are_not_keep_alive() -> None:
    reader = requests()
    reader.receive_data(b"GET http://a.test/ HTTP/1.0\r\n\r\n")
    head, _ = drain(reader)
    assert isinstance(head, RequestHead)
    assert head.http_version == "1.0" and not head.keep_alive
    reader = requests()
    reader.receive_data(b"GET http://a.test/ HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _ = drain(reader)
    assert isinstance(head, RequestHead) and not head.keep_alive


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET /\r\n\r\n", 400, "HTTP version"),
        (b"GET http://a/ HTTP/1.1\nHost: a\n\n", 400, "malformed"),
        (b"GET http://a/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "malformed"),
        (b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, ""),
        (b"GET http://a/" + b"x" * 200 + b" HTTP/1.1\r\n\r\n", 414, "request line"),
        (b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * 11 + b"\r\n", 431, "header fields"),
        (b"GET http://a/ HTTP/1.1\r\nX: " + b"v" * 600 + b"\r\n\r\n", 431, "too large"),
    ],
    ids=["http-0.9", "bare-lf", "obs-fold", "two-lengths", "long-line", "many", "big"],
)
def test_bad_requests_raise_with_the_status_to_answer(
    data: bytes, status: int, reason: str
) -> None:
    reader = requests(max_request_line=100, max_headers=10, max_bytes=512)
    reader.receive_data(data)
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert caught.value.status == status
    assert reason in caught.value.reason


def test_events_before_a_fault_are_delivered_first() -> None:
    reader = requests()
    reader.receive_data(
        b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\r\nBad Header\r\n\r\n"
    )
    head, end = reader.next_event(), reader.next_event()
    assert isinstance(head, RequestHead) and end is END
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_client_closing_mid_body_is_an_error_and_between_requests_is_closed() -> None:
    reader = requests()
    reader.receive_data(b"POST http://a/ HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    drain(reader)
    reader.receive_eof()
    with pytest.raises(ProtocolError, match="closed in the middle"):
        reader.next_event()
    idle = requests()
    idle.receive_eof()
    assert idle.next_event() is CLOSED


def test_interim_responses_precede_the_final_one_and_the_connection_is_reusable() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    interim, final, body, end = drain(reader)
    assert isinstance(interim, ResponseHead) and interim.status == 100
    assert isinstance(final, ResponseHead) and final.status == 200 and final.chunked
    assert (body, end) == (b"hello", END)
    assert reader.clean_for_reuse()


def test_read_until_close_body_ends_at_eof_and_rules_out_reuse() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc")
    head, body = drain(reader)
    assert body == b"abc"
    assert isinstance(head, ResponseHead) and head.content_length is None and not head.chunked
    reader.receive_eof()
    assert reader.next_event() is END
    assert not reader.clean_for_reuse()


def test_truncated_length_body_is_an_error() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    drain(reader)
    reader.receive_eof()
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_head_response_ends_at_its_head_and_the_next_response_parses() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=True)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    head, end = drain(reader)
    assert isinstance(head, ResponseHead) and head.content_length == 1000 and end is END
    assert reader.clean_for_reuse()
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    head, end = drain(reader)
    assert isinstance(head, ResponseHead) and head.status == 204 and end is END
    assert reader.clean_for_reuse()


def test_body_after_a_head_response_makes_the_connection_unusable() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=True)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert len(drain(reader)) == 2
    assert reader.stray and not reader.clean_for_reuse()


def test_switching_response_keeps_the_bytes_after_it() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x00"
    )
    (head,) = drain(reader)
    assert isinstance(head, ResponseHead) and head.status == 101
    assert head.reason == b"Switching Protocols"
    assert reader.trailing_data == (b"\x81\x00", False)


def test_switching_response_without_connection_upgrade_is_invalid() -> None:
    # RFC 9110 §7.8: a sender of Upgrade must also send the "upgrade" connection option.
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert isinstance(reader.next_event(), ResponseHead)
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_origin_connection_close_rules_out_reuse() -> None:
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    drain(reader)
    assert not reader.clean_for_reuse()


def test_oversized_response_head_is_refused_even_before_it_ends() -> None:
    reader = ResponseReader(100)
    reader.expect_response(head_only=False)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 200)
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert caught.value.status == 502


def test_heads_serialise_in_wire_order() -> None:
    assert request_head(b"GET", b"/p?q", [(b"Host", b"a"), (b"X", b"1")]) == (
        b"GET /p?q HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n"
    )
    assert response_head(404, b"Not Found", [(b"Content-Length", b"0")]) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.integers(1, 64))
def test_chunked_body_written_here_parses_back_to_the_same_bytes(
    pieces: list[bytes], split: int
) -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(b"".join(chunk(piece)) for piece in pieces) + LAST_CHUNK
    reader = ResponseReader(4096)
    reader.expect_response(head_only=False)
    events: list[Event] = []
    for start in range(0, len(wire), split):  # fed in arbitrary slices
        reader.receive_data(wire[start : start + split])
        events += drain(reader)
    assert events[-1] is END
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"".join(pieces)


_PIPELINE = (
    b"GET http://a.test/one HTTP/1.1\r\nHost: a.test\r\n\r\n"
    b"POST http://a.test/two HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT http://a.test/three HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
)


def _summary(events: list[Event]) -> list[object]:
    """Events with body pieces joined per message (how the body is split is not meaningful)."""
    out: list[object] = []
    body = b""
    for event in events:
        if isinstance(event, bytes):
            body += event
        elif isinstance(event, RequestHead):
            out.append((event.method, event.target, tuple(event.raw_headers)))
        else:
            out += [body, event]
            body = b""
    return out


@given(st.lists(st.integers(1, len(_PIPELINE) - 1), max_size=12))
def test_pipelined_requests_parse_alike_however_the_bytes_are_split(cuts: list[int]) -> None:
    whole = requests()
    whole.receive_data(_PIPELINE)
    expected = _summary(drain(whole))
    assert len(expected) == 9 and expected[-2] == b"abcde"
    reader = requests()
    events: list[Event] = []
    bounds = [0, *sorted(set(cuts)), len(_PIPELINE)]
    for start, end in itertools.pairwise(bounds):
        reader.receive_data(_PIPELINE[start:end])
        events += drain(reader)
    assert _summary(events) == expected


@given(st.binary(max_size=512), st.binary(max_size=64))
def test_arbitrary_bytes_give_events_or_a_protocol_error_only(prefix: bytes, data: bytes) -> None:
    for reader in (requests(max_request_line=64, max_headers=4, max_bytes=128), ResponseReader(64)):
        if isinstance(reader, ResponseReader):
            reader.expect_response(head_only=False)
        try:
            reader.receive_data(prefix + data)
            reader.receive_data(data or b"\r\n")
            reader.receive_eof()
            for _ in range(1000):  # bounded: each call consumes an event or ends
                event = reader.next_event()
                if event is CLOSED or event is NEED_DATA:
                    break
                assert isinstance(event, (RequestHead, ResponseHead, bytes)) or event is END
        except ProtocolError as exc:
            assert exc.status in (400, 414, 431, 502) and exc.reason
