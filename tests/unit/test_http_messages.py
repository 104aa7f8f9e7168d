"""The proxy's HTTP rules without sockets: targets, framing, hop-by-hop headers, limits, errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluidity.agent.http_messages import (
    CHUNKED,
    BadRequestError,
    HeadScanner,
    Target,
    downstream_response_headers,
    failure_status,
    failure_text,
    parse_absolute_target,
    parse_authority,
    parse_connect_target,
    request_body_framing,
    upgrade_protocols,
    upstream_request_headers,
)
from fluidity.agent.streams import OpenFailure

# -- request targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://example.com/a/b?c=d", Target("example.com", 80, b"example.com", b"/a/b?c=d")),
        (b"http://example.com", Target("example.com", 80, b"example.com", b"/")),
        (b"http://example.com?q", Target("example.com", 80, b"example.com", b"/?q")),
        (b"http://Example.COM:8080/", Target("example.com", 8080, b"Example.COM:8080", b"/")),
        (b"HTTP://example.com:/x", Target("example.com", 80, b"example.com:", b"/x")),
        (b"http://example.com/x#frag", Target("example.com", 80, b"example.com", b"/x")),
        (b"http://10.0.0.1:81/", Target("10.0.0.1", 81, b"10.0.0.1:81", b"/")),
        (b"http://[::1]/", Target("::1", 80, b"[::1]", b"/")),
        (b"http://[2001:DB8::1]:8443/p", Target("2001:db8::1", 8443, b"[2001:DB8::1]:8443", b"/p")),
    ],
)
def test_absolute_form_targets_become_host_port_and_origin_form(
    target: bytes, expected: Target
) -> None:
    assert parse_absolute_target(b"GET", target) == expected


def test_options_with_empty_path_becomes_asterisk_form() -> None:
    assert parse_absolute_target(b"OPTIONS", b"http://example.com").path == b"*"
    assert parse_absolute_target(b"OPTIONS", b"http://example.com/").path == b"/"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (b"https://example.com/", "CONNECT"),
        (b"ftp://example.com/", "only http://"),
        (b"/just/a/path", "this is a proxy"),
        (b"example.com:80", "this is a proxy"),
        (b"http:///path", "empty host"),
        (b"http://user:pw@example.com/", "user:password"),
        (b"http://example.com:0/", "port"),
        (b"http://example.com:65536/", "port"),
        (b"http://example.com:123456/", "port"),
        (b"http://example.com:8o/", "port"),
        (b"http://exa mple.com/", "invalid host"),
        (b"http://[::1/", "IPv6"),
        (b"http://[not-v6]/", "IPv6"),
        (b"http://[::1]x/", "IPv6"),
    ],
)
def test_unusable_absolute_targets_are_refused(target: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as refused:
        parse_absolute_target(b"GET", target)
    assert refused.value.status == 400
    assert message in refused.value.reason


def test_connect_targets_need_host_and_port() -> None:
    assert parse_connect_target(b"example.com:443") == Target(
        "example.com", 443, b"example.com:443", b""
    )
    assert parse_connect_target(b"[::1]:8443").host == "::1"
    for bad in (b"example.com", b"example.com:", b":443", b"example.com:0", b"[::1]", b""):
        with pytest.raises(BadRequestError):
            parse_connect_target(bad)


def test_target_display_puts_ipv6_in_brackets() -> None:
    assert parse_connect_target(b"[::1]:443").display == "[::1]:443"
    assert parse_connect_target(b"Example.com:443").key == ("example.com", 443)


@given(st.binary(max_size=40))
def test_authority_parsing_either_succeeds_sanely_or_refuses(authority: bytes) -> None:
    try:
        host, port = parse_authority(authority, 80)
    except BadRequestError as refused:
        assert refused.status == 400
    else:
        assert host and 0 < port < 65536


@given(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.integers(1, 65535),
)
def test_valid_authorities_round_trip(host: str, port: int) -> None:
    target = parse_absolute_target(b"GET", f"http://{host}:{port}/x".encode())
    assert (target.host, target.port, target.path) == (host, port, b"/x")


# -- body framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"content-length", b"0")], 0),
        ([(b"content-length", b"42")], 42),
        ([(b"content-length", b"42, 42")], 42),
        ([(b"content-length", b"42"), (b"content-length", b"42")], 42),
        ([(b"transfer-encoding", b"chunked")], CHUNKED),
        ([(b"transfer-encoding", b"Chunked")], CHUNKED),
    ],
)
def test_request_framing_is_read_from_the_headers(
    headers: list[tuple[bytes, bytes]], expected: int | None
) -> None:
    assert request_body_framing(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        [(b"content-length", b"5"), (b"content-length", b"6")],
        [(b"content-length", b"5, 6")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"+5")],
        [(b"content-length", b"0x10")],
        [(b"content-length", b"")],
        [(b"content-length", b"99999999999999999999")],
        [(b"content-length", b"9223372036854775808")],
        [(b"transfer-encoding", b"gzip")],
        [(b"transfer-encoding", b"gzip, chunked")],
        [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"identity")],
    ],
)
def test_ambiguous_framing_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequestError) as refused:
        request_body_framing(headers)
    assert refused.value.status == 400


# -- headers -----------------------------------------------------------------------------------


def test_upstream_headers_drop_hop_by_hop_and_restate_host_and_framing() -> None:
    client = [
        (b"Host", b"wrong.example"),
        (b"User-Agent", b"curl"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"1"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Keep-Alive", b"300"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Accept", b"*/*"),
    ]
    out = upstream_request_headers(
        client, authority=b"example.com:8080", body_framing=CHUNKED, upgrade=None
    )
    assert out == [
        (b"Host", b"example.com:8080"),
        (b"User-Agent", b"curl"),
        (b"Accept", b"*/*"),
        (b"Transfer-Encoding", b"chunked"),
    ]


def test_upstream_headers_carry_content_length_and_upgrade() -> None:
    client = [
        (b"Host", b"example.com"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"abc"),
        (b"Content-Length", b"0"),
    ]
    lowered = [(n.lower(), v) for n, v in client]
    upgrade = upgrade_protocols(lowered)
    assert upgrade == b"websocket"
    out = upstream_request_headers(
        client, authority=b"example.com", body_framing=0, upgrade=upgrade
    )
    assert out == [
        (b"Host", b"example.com"),
        (b"Sec-WebSocket-Key", b"abc"),
        (b"Content-Length", b"0"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
    ]


def test_upgrade_needs_both_the_header_and_the_connection_token() -> None:
    assert upgrade_protocols([(b"upgrade", b"websocket")]) is None
    assert upgrade_protocols([(b"connection", b"upgrade")]) is None
    assert upgrade_protocols([(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"ws")]) == (
        b"ws"
    )


def test_response_headers_drop_hop_by_hop_and_length_when_chunked() -> None:
    origin = [
        (b"Content-Type", b"text/html"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),  # ignored by the origin's framing: must not reach the client
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert downstream_response_headers(origin, upgrade=False) == [
        (b"Content-Type", b"text/html"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert downstream_response_headers([(b"Content-Length", b"10")], upgrade=False) == [
        (b"Content-Length", b"10")
    ]


def test_switching_response_keeps_upgrade_headers() -> None:
    origin = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"xyz"),
    ]
    assert downstream_response_headers(origin, upgrade=True) == [
        (b"Sec-WebSocket-Accept", b"xyz"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
    ]


# -- head limits -------------------------------------------------------------------------------


def _scan(data: bytes, pieces: list[int] | None = None) -> int | None:
    scanner = HeadScanner(max_request_line=100, max_headers=5, max_header_bytes=400)
    cuts = sorted({0, len(data), *(p % (len(data) + 1) for p in pieces or [])})
    for start, end in itertools.pairwise(cuts):
        problem = scanner.feed(data[start:end])
        if problem is not None:
            return problem.status
    return None


def _head(target_len: int = 1, headers: int = 1, value_len: int = 1) -> bytes:
    lines = [b"GET /" + b"x" * target_len + b" HTTP/1.1"]
    lines += [b"X-H%d: " % i + b"v" * value_len for i in range(headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + b"body bytes are not scanned " * 50


def test_head_within_limits_passes() -> None:
    assert _scan(_head(target_len=80, headers=5, value_len=40)) is None


def test_long_request_line_is_414_even_before_it_ends() -> None:
    assert _scan(_head(target_len=100)) == 414
    assert _scan(b"GET /" + b"x" * 200) == 414


def test_too_many_or_too_large_headers_are_431() -> None:
    assert _scan(_head(headers=6)) == 431
    assert _scan(_head(headers=1, value_len=500)) == 431
    assert _scan(b"GET / HTTP/1.1\r\nX: " + b"v" * 500) == 431


@given(
    st.sampled_from([_head(80, 5, 40), _head(100), _head(headers=6), _head(value_len=500)]),
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_head_verdict_does_not_depend_on_how_bytes_arrive(head: bytes, cuts: list[int]) -> None:
    assert _scan(head, cuts) == _scan(head)


def test_scanner_reports_started_and_resets() -> None:
    scanner = HeadScanner(100, 5, 400)
    assert not scanner.started
    scanner.feed(b"GET")
    assert scanner.started
    scanner.reset()
    assert not scanner.started


# -- failures ----------------------------------------------------------------------------------


def test_failure_statuses() -> None:
    expected = {
        OpenFailure.DENIED: 403,
        OpenFailure.TIMEOUT: 504,
        OpenFailure.TUNNEL_DOWN: 503,
        OpenFailure.LIMIT: 503,
        OpenFailure.REFUSED: 502,
        OpenFailure.DNS: 502,
        OpenFailure.UNREACHABLE: 502,
        OpenFailure.LINK_LOST: 502,
        OpenFailure.RESET: 502,
        OpenFailure.ERROR: 502,
    }
    assert {failure: failure_status(failure) for failure in OpenFailure} == expected


def test_failure_text_is_one_line_with_detail_when_it_adds_something() -> None:
    assert (
        failure_text("example.test:80", OpenFailure.REFUSED, "Connection refused")
        == "fluidity: cannot reach example.test:80: connection refused\n"
    )
    text = failure_text("x.test:80", OpenFailure.DNS, "Name or service\nnot known")
    assert text == (
        "fluidity: cannot reach x.test:80: DNS lookup failed (Name or service not known)\n"
    )
