"""Which connections :func:`serve_requests_now` takes, and that it leaves the others untouched.

The same fakes as for the CONNECT fast path: a declined connection must see no side effect (no
stream opened, nothing counted or sent, no protocol switched), since the task-based session then
serves the same bytes from the start.
"""

from __future__ import annotations

import pytest

from fluidity.agent.request_relay import RequestRelay, serve_requests_now

from .test_connect_fast_path import (
    UNREADY,
    FakeOpener,
    FakeProxy,
    FakeStream,
    FakeTransport,
    unready_proxy,
)

SMUGGLED = b"GET http://e.com/ HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n"
GET = b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\nX-Kept: 1\r\n\r\n"


def never_hand_over(*args: object) -> None:
    raise AssertionError("nothing to hand over on a first read")


def offer(first: bytes, proxy: FakeProxy) -> tuple[bool, FakeTransport]:
    transport = FakeTransport()
    taken = serve_requests_now(proxy, transport, first, never_hand_over)  # type: ignore[arg-type]
    return taken, transport


async def test_a_whole_bodyless_request_with_a_link_up_is_relayed() -> None:
    stream = FakeStream()
    opener = FakeOpener(stream)
    proxy = FakeProxy(opener)
    taken, transport = offer(GET + b"GET http://example.com/b", proxy)  # and a partial second
    assert taken
    assert isinstance(transport.protocol, RequestRelay)
    assert proxy.adopted == [transport.protocol] and proxy.requests == 1
    assert opener.opened == [("example.com", 80)]
    # Origin form, Host from the URL, the client's other fields kept.
    assert stream.written == [b"GET /a HTTP/1.1\r\nHost: example.com\r\nX-Kept: 1\r\n\r\n"]
    assert stream.consumer is transport.protocol
    assert transport.out == []  # nothing for the client before the origin answers


async def test_the_response_goes_out_and_the_next_request_reuses_the_stream() -> None:
    stream = FakeStream()
    opener = FakeOpener(stream)
    proxy = FakeProxy(opener)
    taken, transport = offer(GET, proxy)
    relay = transport.protocol
    assert taken and isinstance(relay, RequestRelay)
    relay.stream_open()
    relay.stream_data(memoryview(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert transport.out == [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    assert stream.released == len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    relay.data_received(GET.replace(b"/a", b"/second"))
    assert opener.opened == [("example.com", 80)]  # the same stream
    assert stream.written[-1].startswith(b"GET /second HTTP/1.1\r\n")
    assert proxy.requests == 2


@pytest.mark.parametrize(
    ("why", "first"),
    [
        ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        ("SOCKS5 greeting", b"\x05\x01\x00"),
        ("head split over reads", b"GET http://example.com/ HTTP/1.1\r\nHost: exa"),
        ("malformed", b"GET http://example.com/ HTTP/9\r\n\r\n"),
        ("origin form", b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("https URL", b"GET https://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("the proxy itself", b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("a body", b"GET http://e.com/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
        ("chunked body", b"GET http://e.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("not idempotent", b"POST http://e.com/ HTTP/1.1\r\nHost: e.com\r\n\r\n"),
        ("upgrade", b"GET http://e.com/ HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"),
        ("request line too long", b"GET http://" + b"a" * 190 + b".com/ HTTP/1.1\r\n\r\n"),
        ("too many header fields", b"GET http://e.com/ HTTP/1.1\r\n" + b"X: y\r\n" * 6 + b"\r\n"),
        ("smuggling", SMUGGLED),
    ],
)
async def test_requests_the_session_must_serve_are_left_untouched(why: str, first: bytes) -> None:
    opener = FakeOpener(FakeStream())
    proxy = FakeProxy(opener)
    taken, transport = offer(first, proxy)
    assert not taken, why
    assert transport.protocol is None and opener.opened == [] and proxy.adopted == []
    assert proxy.requests == 0 and transport.out == []


@pytest.mark.parametrize("why", UNREADY)
async def test_a_proxy_that_cannot_relay_at_once_leaves_the_connection_alone(why: str) -> None:
    proxy = unready_proxy(why)
    taken, transport = offer(GET, proxy)
    assert not taken, why
    assert transport.protocol is None and proxy.adopted == [] and proxy.requests == 0
