"""Which connections :func:`serve_connect_now` takes, and that it leaves the others untouched.

Fakes stand in for the proxy, the transport and the stream: the decision is plain logic. A refused
connection must see no side effect at all (no stream opened, no counter moved, no protocol
switched), since the task-based session then serves the same bytes from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fluidity.agent.connect_tunnel import CONNECT_OK, ConnectTunnel, serve_connect_now
from fluidity.agent.http_proxy import ProxyLimits
from fluidity.agent.streams import OpenFailure, PushStream, StreamConsumer, StreamOpenError

HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


class FakeStream(PushStream):
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.consumer: StreamConsumer | None = None
        self.closed = False
        self.released = 0

    def push_to(self, consumer: StreamConsumer | None) -> None:
        self.consumer = consumer

    def release(self, n: int) -> None:
        self.released += n

    @property
    def write_blocked(self) -> bool:
        return False

    def on_writable(self, callback: Callable[[], None] | None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    def __init__(self, stream: FakeStream | None) -> None:
        self.stream = stream
        self.opened: list[tuple[str, int]] = []

    async def open(self, host: str, port: int) -> Any:
        raise AssertionError("the fast path never waits for an open")

    def open_now(self, host: str, port: int) -> FakeStream | None:
        self.opened.append((host, port))
        return self.stream


class FakeProxy:
    def __init__(self, opener: object, *, authorizer: object = None, full: bool = False) -> None:
        self.opener = opener
        self.authorizer = authorizer
        self.limits = ProxyLimits(max_request_line=200, max_headers=5, max_header_bytes=400)
        self.full = full
        self.adopted: list[ConnectTunnel] = []
        self.open_failures = 0
        self.requests = 0

    def admits_another(self) -> bool:
        return not self.full

    def is_own_address(self, host: str, port: int) -> bool:
        return (host, port) == ("127.0.0.1", 8080)

    def adopt_connection(self, tunnel: ConnectTunnel) -> None:
        self.adopted.append(tunnel)

    def connection_closed(self, tunnel: ConnectTunnel) -> None:
        self.adopted.remove(tunnel)


class FakeTransport:
    def __init__(self) -> None:
        self.protocol: object = None
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.out.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True


def offer(first: bytes, proxy: FakeProxy) -> tuple[bool, FakeTransport]:
    transport = FakeTransport()
    taken = serve_connect_now(proxy, transport, first)  # type: ignore[arg-type]
    return taken, transport


def test_a_whole_connect_head_with_a_link_up_becomes_a_task_less_tunnel() -> None:
    stream = FakeStream()
    opener = FakeOpener(stream)
    proxy = FakeProxy(opener)
    taken, transport = offer(HEAD + b"\x16\x03\x01early", proxy)
    assert taken
    assert opener.opened == [("example.com", 443)]
    assert isinstance(transport.protocol, ConnectTunnel)
    assert proxy.adopted == [transport.protocol]
    assert proxy.requests == 1
    assert stream.written == [b"\x16\x03\x01early"]  # queued until the stream opens
    assert stream.consumer is transport.protocol
    assert transport.out == []  # no 200 before the target accepted
    transport.protocol.stream_open()
    assert transport.out == [CONNECT_OK]


def test_an_open_failure_is_answered_like_the_session_and_closed() -> None:
    stream = FakeStream()
    proxy = FakeProxy(FakeOpener(stream))
    taken, transport = offer(HEAD, proxy)
    assert taken and isinstance(transport.protocol, ConnectTunnel)
    transport.protocol.stream_error(StreamOpenError(OpenFailure.DENIED, "egress policy says no"))
    (answer,) = transport.out
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"Connection: close\r\n" in answer
    assert answer.endswith(b"egress policy says no)\n")
    assert transport.closed and proxy.open_failures == 1


@pytest.mark.parametrize(
    ("why", "first"),
    [
        ("not CONNECT", b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        ("head split over reads", b"CONNECT example.com:443 HTTP/1.1\r\nHost: exa"),
        ("malformed", b"CONNECT example.com:443 HTTP/9\r\n\r\n"),
        ("no port", b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        ("request line too long", b"CONNECT " + b"a" * 190 + b".com:443 HTTP/1.1\r\n\r\n"),
        ("too many header fields", b"CONNECT e.com:443 HTTP/1.1\r\n" + b"X: y\r\n" * 6 + b"\r\n"),
        ("a body", b"CONNECT e.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
    ],
)
def test_heads_the_session_must_judge_are_left_untouched(why: str, first: bytes) -> None:
    opener = FakeOpener(FakeStream())
    proxy = FakeProxy(opener)
    taken, transport = offer(first, proxy)
    assert not taken, why
    assert transport.protocol is None and opener.opened == [] and proxy.adopted == []


#: Why a proxy cannot serve a connection at once, for :func:`unready_proxy`.
UNREADY = ["proxy auth", "connection limit", "no link", "plain opener"]


def unready_proxy(why: str) -> FakeProxy:
    """A proxy that must leave connections to the session, for the reason ``why``."""
    opener: object = FakeOpener(None if why == "no link" else FakeStream())
    if why == "plain opener":
        opener = object()  # a StreamOpener without open_now (e.g. a direct opener in tests)
    return FakeProxy(
        opener,
        authorizer=(lambda headers: None) if why == "proxy auth" else None,
        full=why == "connection limit",
    )


@pytest.mark.parametrize("why", UNREADY)
def test_a_proxy_that_cannot_serve_at_once_leaves_the_connection_to_the_session(why: str) -> None:
    proxy = unready_proxy(why)
    taken, transport = offer(HEAD, proxy)
    assert not taken, why
    assert transport.protocol is None and proxy.adopted == []
