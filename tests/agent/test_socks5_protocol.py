"""The SOCKS5 handshake without sockets: RFC 1928 requests, RFC 1929 logins, and bad input."""

from __future__ import annotations

import pytest

from fluidity.agent.socks5 import (
    ConnectRequest,
    HandshakeFailed,
    Reply,
    Socks5Handshake,
    reply_for,
)
from fluidity.agent.streams import OpenFailure

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"
SUCCESS_REPLY = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def login(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def check(user: bytes, password: bytes) -> bool:
    return (user, password) == (b"alice", b"s3cret")


@pytest.mark.parametrize(
    ("request_bytes", "host", "port"),
    [
        (b"\x05\x01\x00\x03\x0bexample.com\x01\xbb", "example.com", 443),
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90", "127.0.0.1", 8080),
        (b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50", "::1", 80),
    ],
)
def test_connect_requests_for_every_address_type_even_fed_byte_by_byte(
    request_bytes: bytes, host: str, port: int
) -> None:
    handshake = Socks5Handshake()
    data = GREETING_NO_AUTH + request_bytes + b"early"
    events = [handshake.receive_data(data[i : i + 1]) for i in range(len(data) - 5)]
    assert events[:-1] == [None] * (len(events) - 1)
    assert events[-1] == ConnectRequest(host, port)
    assert handshake.data_to_send() == b"\x05\x00"
    assert handshake.receive_data(b"early") is None
    handshake.reply(Reply.SUCCEEDED)
    assert handshake.data_to_send() == SUCCESS_REPLY
    assert handshake.trailing_data == b"early"


def test_greeting_login_and_request_in_one_chunk() -> None:
    handshake = Socks5Handshake(check)
    event = handshake.receive_data(
        GREETING_USERPASS + login(b"alice", b"s3cret") + b"\x05\x01\x00\x03\x01h\x00\x50"
    )
    assert event == ConnectRequest("h", 80)
    assert handshake.data_to_send() == b"\x05\x02\x01\x00"
    assert handshake.username == "alice"


def test_wrong_password_is_refused_with_the_rfc1929_failure() -> None:
    handshake = Socks5Handshake(check)
    event = handshake.receive_data(GREETING_USERPASS + login(b"alice", b"nope"))
    assert event == HandshakeFailed("wrong user name or password", auth=True)
    assert handshake.data_to_send() == b"\x05\x02\x01\x01"
    with pytest.raises(RuntimeError):
        handshake.receive_data(b"\x05")


def test_a_client_without_username_password_is_refused_when_login_is_required() -> None:
    handshake = Socks5Handshake(check)
    event = handshake.receive_data(b"\x05\x02\x00\x01")
    assert isinstance(event, HandshakeFailed) and event.auth
    assert handshake.data_to_send() == b"\x05\xff"


def test_without_required_login_a_username_password_only_client_is_let_in() -> None:
    handshake = Socks5Handshake()
    assert handshake.receive_data(GREETING_USERPASS + login(b"any", b"thing")) is None
    assert handshake.data_to_send() == b"\x05\x02\x01\x00"


@pytest.mark.parametrize(
    ("data", "answer", "reason"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"", "not SOCKS5 (version byte 0x04)"),
        (b"GET / HTTP/1.1\r\n", b"", "not SOCKS5 (version byte 0x47)"),
        (b"\x05\x00", b"\x05\xff", "client offered no authentication method"),
        (b"\x05\x01\x80", b"\x05\xff", "client does not offer no authentication"),
    ],
)
def test_bad_greetings_are_refused(data: bytes, answer: bytes, reason: str) -> None:
    handshake = Socks5Handshake()
    event = handshake.receive_data(data)
    assert event == HandshakeFailed(reason)
    assert handshake.data_to_send() == answer


@pytest.mark.parametrize(
    ("login_bytes", "reason"),
    [
        (b"\x05\x05alice\x06s3cret", "bad username/password version 0x05 (RFC 1929 needs 1)"),
        (b"\x01\x00\x06s3cret", "empty user name"),
    ],
)
def test_bad_logins_are_refused(login_bytes: bytes, reason: str) -> None:
    handshake = Socks5Handshake(check)
    event = handshake.receive_data(GREETING_USERPASS + login_bytes)
    assert isinstance(event, HandshakeFailed) and event.reason == reason
    assert handshake.data_to_send() == b"\x05\x02\x01\x01"


@pytest.mark.parametrize(
    ("request_bytes", "code", "reason"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07, "command 0x02 (BIND)"),
        (b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07, "command 0x03 (UDP_ASSOCIATE)"),
        (b"\x05\x09\x00\x01", 0x07, "command 0x09 (unknown)"),
        (b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50", 0x08, "address type 0x05"),
        (b"\x05\x01\x00\x03\x00\x00\x50", 0x01, "domain name is empty"),
        (b"\x05\x01\x00\x03\x02\xc3\xa9\x00\x50", 0x01, "not printable ASCII"),
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", 0x01, "port 0"),
        (b"\x04\x01\x00\x01", 0x01, "bad request version 0x04"),
    ],
)
def test_bad_requests_get_the_right_reply_code(
    request_bytes: bytes, code: int, reason: str
) -> None:
    handshake = Socks5Handshake()
    event = handshake.receive_data(GREETING_NO_AUTH + request_bytes)
    assert isinstance(event, HandshakeFailed) and reason in event.reason
    assert handshake.data_to_send() == b"\x05\x00" + bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def test_a_truncated_request_waits_for_more() -> None:
    handshake = Socks5Handshake()
    assert handshake.receive_data(GREETING_NO_AUTH + b"\x05\x01\x00\x03\x0bexam") is None
    assert handshake.receive_data(b"ple.com\x01") is None
    assert handshake.receive_data(b"\xbb") == ConnectRequest("example.com", 443)


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x03\x00\x02",  # three methods announced, two sent
        GREETING_USERPASS + b"\x01\x05ali",  # a 5-byte user name cut short
        GREETING_USERPASS + b"\x01\x05alice\x06s3c",  # a 6-byte password cut short
        GREETING_USERPASS + login(b"alice", b"s3cret") + b"\x05\x01\x00\x04\x00\x00",  # IPv6
        GREETING_USERPASS + login(b"alice", b"s3cret") + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00",
    ],
)
def test_a_message_shorter_than_its_lengths_say_waits_without_answering_it(data: bytes) -> None:
    handshake = Socks5Handshake(check)
    assert handshake.receive_data(data) is None
    assert handshake.username in (None, "alice")
    assert not handshake.data_to_send().endswith(SUCCESS_REPLY)
    assert handshake.trailing_data == b""


def test_reply_is_only_valid_after_a_request() -> None:
    with pytest.raises(RuntimeError):
        Socks5Handshake().reply(Reply.SUCCEEDED)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (OpenFailure.REFUSED, 0x05),
        (OpenFailure.UNREACHABLE, 0x04),
        (OpenFailure.DNS, 0x04),
        (OpenFailure.TIMEOUT, 0x06),
        (OpenFailure.DENIED, 0x02),
        (OpenFailure.TUNNEL_DOWN, 0x01),
        (OpenFailure.LIMIT, 0x01),
        (OpenFailure.LINK_LOST, 0x01),
        (OpenFailure.RESET, 0x01),
        (OpenFailure.ERROR, 0x01),
    ],
)
def test_open_failures_map_to_socks_reply_codes(failure: OpenFailure, code: int) -> None:
    assert reply_for(failure) == code
