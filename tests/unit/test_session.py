"""Session behaviour: an agent and a server session driven against each other, no sockets."""

from __future__ import annotations

import pytest

from fluidity.wire import frames
from fluidity.wire.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    LinkReady,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
)
from fluidity.wire.frames import ErrorCode, FrameReader, FrameType, ProtocolError
from fluidity.wire.keepalive import Keepalive, KeepaliveAction
from fluidity.wire.session import Role, Session, SessionSettings, SessionStateError

KIB = 1024
Frame = tuple[int, int, int, bytes]


def decode(data: bytes) -> list[Frame]:
    """The frames in ``data``, with payloads as bytes (data must hold whole frames)."""
    reader = FrameReader()
    out = [(t, f, s, bytes(p)) for t, f, s, p in reader.feed(data)]
    assert reader.buffered == 0
    return out


def data_frames(data: bytes) -> list[Frame]:
    return [f for f in decode(data) if f[0] == FrameType.DATA]


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def raw(frame_type: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return frames.encode(frame_type, flags, stream_id, payload)


def hello(version: int = 1, window: int = 256 * KIB, max_frame: int = 64 * KIB) -> bytes:
    return raw(FrameType.HELLO, 0, frames.hello_payload(version, window, max_frame))


class Link:
    """An agent and a server session whose bytes are delivered by hand (``pump``) or in steps."""

    def __init__(
        self,
        agent: SessionSettings | None = None,
        server: SessionSettings | None = None,
        *,
        handshake: bool = True,
    ) -> None:
        self.agent = Session(Role.AGENT, agent)
        self.server = Session(Role.SERVER, server)
        if handshake:
            agent_events, server_events = self.pump()
            assert [type(e) for e in agent_events] == [LinkReady]
            assert [type(e) for e in server_events] == [LinkReady]

    def to_server(self) -> list[Event]:
        return self.server.receive_data(self.agent.data_to_send())

    def to_agent(self) -> list[Event]:
        return self.agent.receive_data(self.server.data_to_send())

    def pump(self, *, consume: bool = False) -> tuple[list[Event], list[Event]]:
        """Deliver bytes both ways until neither side has anything to send.

        Returns (events the agent received, events the server received). With ``consume``, every
        DataReceived is consumed at once, as an application that reads promptly would.
        """
        agent_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(10_000):
            if not (self.agent.has_data_to_send() or self.server.has_data_to_send()):
                return agent_events, server_events
            for events, session in ((self.to_server(), self.server), (self.to_agent(), self.agent)):
                target = server_events if session is self.server else agent_events
                target += events
                if consume:
                    for event in events:
                        if isinstance(event, DataReceived):
                            session.consumed(event.stream_id, len(event.data))
        raise AssertionError("link never went quiet")

    def open(self, host: str = "example.com", port: int = 443) -> int:
        """Open a stream from the agent and accept it on the server."""
        stream_id = self.agent.open_stream(host, port)
        assert self.to_server() == [StreamOpenRequested(stream_id, host, port)]
        self.server.accept_stream(stream_id)
        assert self.to_agent() == [StreamOpened(stream_id)]
        return stream_id


def server_after_hello(settings: SessionSettings | None = None) -> Session:
    server = Session(Role.SERVER, settings)
    server.data_to_send()
    server.receive_data(hello())
    return server


def agent_after_hello(settings: SessionSettings | None = None) -> Session:
    agent = Session(Role.AGENT, settings)
    agent.data_to_send()
    agent.receive_data(hello())
    return agent


def goaway_sent_by(session: Session) -> tuple[int, ErrorCode, str]:
    sent = [f for f in decode(session.data_to_send()) if f[0] == FrameType.GOAWAY]
    assert len(sent) == 1
    return frames.parse_goaway(sent[0][3])


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_window": 1023},
        {"initial_window": frames.MAX_WINDOW + 1},
        {"max_frame_size": 1023},
        {"max_frame_size": frames.MAX_FRAME_PAYLOAD + 1},
        {"max_streams": 0},
    ],
)
def test_settings_out_of_range_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SessionSettings(**kwargs)


def test_settings_defaults() -> None:
    s = SessionSettings()
    assert (s.initial_window, s.max_frame_size, s.max_streams) == (1024 * KIB, 256 * KIB, 1024)


# --- handshake -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_each_side_sends_hello_with_its_settings_first(role: Role) -> None:
    session = Session(role, SessionSettings(initial_window=8 * KIB, max_frame_size=2 * KIB))
    assert decode(session.data_to_send()) == [
        (FrameType.HELLO, 0, 0, frames.hello_payload(1, 8 * KIB, 2 * KIB))
    ]
    assert session.data_to_send() == b""


def test_link_ready_reports_the_peer_settings() -> None:
    link = Link(
        SessionSettings(initial_window=4 * KIB, max_frame_size=1 * KIB),
        SessionSettings(initial_window=8 * KIB, max_frame_size=4 * KIB),
        handshake=False,
    )
    agent_events, server_events = link.pump()
    assert agent_events == [LinkReady(1, 8 * KIB, 4 * KIB)]
    assert server_events == [LinkReady(1, 4 * KIB, 1 * KIB)]
    assert link.agent.peer_ready and link.server.peer_ready
    # Each side sends frames no bigger than the smaller of the two maximums.
    assert link.agent.peer_max_frame == link.server.peer_max_frame == 1 * KIB


def test_agent_cannot_open_before_peer_hello() -> None:
    agent = Session(Role.AGENT)
    with pytest.raises(SessionStateError, match="HELLO"):
        agent.open_stream("example.com", 443)
    assert agent.open_streams == 0


def test_server_cannot_open_streams() -> None:
    link = Link()
    with pytest.raises(SessionStateError, match="only the agent"):
        link.server.open_stream("example.com", 443)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw(FrameType.DATA, 1, b"x"), id="DATA"),
        pytest.param(raw(FrameType.OPEN, 1, frames.open_payload("a.b", 1)), id="OPEN"),
        pytest.param(raw(FrameType.PING, 0, b"12345678"), id="PING"),
        pytest.param(raw(FrameType.WINDOW, 1, frames.window_payload(1)), id="WINDOW"),
        pytest.param(raw(FrameType.GOAWAY, 0, frames.goaway_payload(0, ErrorCode.OK)), id="GOAWAY"),
        pytest.param(
            raw(FrameType.FRAME_SIZE, 0, frames.frame_size_payload(16 * KIB)), id="FRAME_SIZE"
        ),
        pytest.param(raw(42, 0, b"?"), id="unknown"),
    ],
)
def test_frames_before_hello_are_protocol_errors(frame: bytes) -> None:
    server = Session(Role.SERVER)
    with pytest.raises(ProtocolError, match="before HELLO"):
        server.receive_data(frame)
    assert server.failed


def test_second_hello_is_a_protocol_error() -> None:
    link = Link()
    with pytest.raises(ProtocolError, match="second HELLO"):
        link.server.receive_data(hello())


def test_version_mismatch_is_a_protocol_error_with_goaway() -> None:
    server = Session(Role.SERVER)
    server.data_to_send()
    with pytest.raises(ProtocolError, match="version 2") as caught:
        server.receive_data(hello(version=2))
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    assert server.failed and server.goaway_sent
    last, code, message = goaway_sent_by(server)
    assert (last, code) == (0, ErrorCode.PROTOCOL_ERROR)
    assert "upgrade the older side" in message


def test_failed_session_ignores_further_input() -> None:
    server = Session(Role.SERVER)
    with pytest.raises(ProtocolError):
        server.receive_data(b"\xff" * 10)
    assert server.receive_data(hello()) == []
    assert not server.peer_ready


def test_protocol_error_goaway_reaches_the_peer() -> None:
    link = Link()
    link.open()
    with pytest.raises(ProtocolError):
        link.server.receive_data(raw(FrameType.WINDOW, 1, b"\x00\x00\x00\x00"))
    assert link.to_agent() == [
        GoAwayReceived(1, ErrorCode.FLOW_CONTROL, "WINDOW increment 0 out of range")
    ]
    assert link.agent.goaway_received


def test_trailing_hello_bytes_are_ignored() -> None:
    server = Session(Role.SERVER)
    payload = frames.hello_payload(1, 4 * KIB, 2 * KIB) + b"extension"
    assert server.receive_data(raw(FrameType.HELLO, 0, payload)) == [LinkReady(1, 4 * KIB, 2 * KIB)]


def test_unknown_frame_types_are_ignored_after_hello() -> None:
    link = Link()
    stream_id = link.open()
    events = link.server.receive_data(
        raw(200, 99, b"future") + raw(FrameType.DATA, stream_id, b"hi")
    )
    assert events == [DataReceived(stream_id, memoryview(b"hi"))]
    assert not link.server.failed


def _data_frame_sizes(data: bytes) -> list[int]:
    return [len(p) for t, _f, _s, p in FrameReader().feed(data) if t == FrameType.DATA]


def test_frame_size_caps_the_frames_the_peer_sends_within_its_hello() -> None:
    link = Link()  # both sides allow 256 KiB frames (HELLO)
    stream_id = link.open()
    link.server.receive_data(raw(FrameType.FRAME_SIZE, 0, frames.frame_size_payload(16 * KIB)))
    link.server.send_data(stream_id, bytes(100 * KIB))
    assert _data_frame_sizes(link.server.data_to_send()) == [16 * KIB] * 6 + [4 * KIB]
    # Asking for more than HELLO allowed gives HELLO's size back, no more.
    link.server.receive_data(raw(FrameType.FRAME_SIZE, 0, frames.frame_size_payload(1024 * KIB)))
    assert link.server.peer_max_frame == SessionSettings().max_frame_size
    link.server.send_data(stream_id, bytes(300 * KIB))
    assert max(_data_frame_sizes(link.server.data_to_send())) == 256 * KIB


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw(FrameType.FRAME_SIZE, 1, frames.frame_size_payload(16 * KIB)), "on a stream"),
        (raw(FrameType.FRAME_SIZE, 0, (512).to_bytes(4, "big")), "out of range"),
    ],
)
def test_malformed_frame_size_fails_the_link(frame: bytes, match: str) -> None:
    link = Link()
    with pytest.raises(ProtocolError, match=match):
        link.server.receive_data(frame)
    assert link.server.failed


# --- opening streams -----------------------------------------------------------------------------


def test_open_stream_reaches_the_server_as_an_open_request() -> None:
    link = Link()
    first = link.agent.open_stream("example.com", 443)
    second = link.agent.open_stream("10.1.2.3", 22)
    assert (first, second) == (1, 2)
    assert link.to_server() == [
        StreamOpenRequested(1, "example.com", 443),
        StreamOpenRequested(2, "10.1.2.3", 22),
    ]
    assert link.server.stream_ids() == [1, 2]
    assert link.agent.streams_opened == link.server.streams_opened == 2


def test_accepted_stream_is_reported_opened_to_the_agent() -> None:
    link = Link()
    stream_id = link.agent.open_stream("example.com", 443)
    link.to_server()
    link.server.accept_stream(stream_id)
    sent = link.server.data_to_send()
    assert decode(sent) == [(FrameType.OPEN_RESULT, 0, stream_id, b"\x00")]
    assert link.agent.receive_data(sent) == [StreamOpened(stream_id)]


def test_rejected_stream_is_reported_with_code_and_message_and_forgotten() -> None:
    link = Link()
    stream_id = link.agent.open_stream("example.com", 443)
    link.to_server()
    link.server.reject_stream(stream_id, ErrorCode.REFUSED, "connection refused")
    assert not link.server.has_stream(stream_id)
    assert link.to_agent() == [StreamOpenFailed(stream_id, ErrorCode.REFUSED, "connection refused")]
    assert not link.agent.has_stream(stream_id)
    assert link.agent.open_streams == link.server.open_streams == 0


def test_server_rejects_open_beyond_stream_limit() -> None:
    link = Link(server=SessionSettings(max_streams=2))
    ids = [link.agent.open_stream("example.com", 443) for _ in range(3)]
    server_events = link.to_server()
    assert [e.stream_id for e in server_events if isinstance(e, StreamOpenRequested)] == ids[:2]
    assert link.to_agent() == [
        StreamOpenFailed(ids[2], ErrorCode.LIMIT, "stream limit of 2 per link reached")
    ]
    assert link.server.open_streams == 2
    assert link.agent.stream_ids() == ids[:2]
    # Once a stream is gone, a new one fits again.
    link.server.reject_stream(ids[0], ErrorCode.REFUSED)
    link.pump()
    fourth = link.agent.open_stream("example.com", 443)
    assert link.to_server() == [StreamOpenRequested(fourth, "example.com", 443)]


def test_stream_ids_must_increase() -> None:
    server = server_after_hello()
    open_frame = raw(FrameType.OPEN, 3, frames.open_payload("a.b", 1))
    assert server.receive_data(open_frame) == [StreamOpenRequested(3, "a.b", 1)]
    with pytest.raises(ProtocolError, match="not above 3"):
        server.receive_data(open_frame)


def test_open_on_stream_zero_is_a_protocol_error() -> None:
    server = server_after_hello()
    with pytest.raises(ProtocolError, match="stream id 0"):
        server.receive_data(raw(FrameType.OPEN, 0, frames.open_payload("a.b", 1)))


def test_malformed_open_closes_the_link() -> None:
    server = server_after_hello()
    with pytest.raises(ProtocolError, match="OPEN target is malformed"):
        server.receive_data(raw(FrameType.OPEN, 1, b"\x00\x50bad host"))
    assert goaway_sent_by(server)[:2] == (1, ErrorCode.PROTOCOL_ERROR)


def test_agent_refuses_a_target_the_server_would_reject_and_keeps_the_link() -> None:
    link = Link()
    with pytest.raises(ValueError, match="spaces or control"):
        link.agent.open_stream("bad host", 80)
    assert link.agent.open_streams == 0
    assert link.open("good.host", 80) == 1  # the id was not used up, the link is intact


def test_server_may_not_open_streams_on_the_agent() -> None:
    agent = agent_after_hello()
    with pytest.raises(ProtocolError, match="server may not open"):
        agent.receive_data(raw(FrameType.OPEN, 1, frames.open_payload("a.b", 1)))


def test_open_result_sent_to_the_server_is_a_protocol_error() -> None:
    link = Link()
    stream_id = link.open()
    with pytest.raises(ProtocolError, match="OPEN_RESULT sent to the server"):
        link.server.receive_data(raw(FrameType.OPEN_RESULT, stream_id, b"\x00"))


def test_second_open_result_is_a_protocol_error() -> None:
    link = Link()
    stream_id = link.open()
    with pytest.raises(ProtocolError, match="second OPEN_RESULT"):
        link.agent.receive_data(raw(FrameType.OPEN_RESULT, stream_id, b"\x00"))


# --- data ----------------------------------------------------------------------------------------


def test_data_flows_both_ways() -> None:
    link = Link()
    stream_id = link.open()
    assert link.agent.send_data(stream_id, b"GET / HTTP/1.1\r\n\r\n")
    assert link.to_server() == [DataReceived(stream_id, memoryview(b"GET / HTTP/1.1\r\n\r\n"))]
    assert link.server.send_data(stream_id, memoryview(b"HTTP/1.1 200 OK\r\n\r\n"))
    assert received(link.to_agent(), stream_id) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert link.agent.bytes_sent == link.server.bytes_received == 18
    assert link.server.bytes_sent == link.agent.bytes_received == 19


def test_agent_may_send_before_open_result_server_may_not() -> None:
    link = Link()
    stream_id = link.agent.open_stream("example.com", 80)
    link.agent.send_data(stream_id, b"early request")
    # The agent's optimistic data follows its OPEN in the same write.
    assert [f[0] for f in decode(link.agent.data_to_send())] == [FrameType.OPEN, FrameType.DATA]
    link.server.receive_data(
        raw(FrameType.OPEN, stream_id, frames.open_payload("example.com", 80))
        + raw(FrameType.DATA, stream_id, b"early request")
    )
    # The server queues its bytes but holds them until it has accepted the stream.
    assert link.server.send_data(stream_id, b"response")
    link.server.end_stream(stream_id)
    assert link.server.data_to_send() == b""
    assert link.server.pending_bytes(stream_id) == 8
    link.server.accept_stream(stream_id)
    assert decode(link.server.data_to_send()) == [
        (FrameType.OPEN_RESULT, 0, stream_id, b"\x00"),
        (FrameType.DATA, frames.FLAG_END_STREAM, stream_id, b"response"),
    ]


def test_optimistic_data_reaches_the_server_with_the_open_request() -> None:
    link = Link()
    stream_id = link.agent.open_stream("example.com", 80)
    link.agent.send_data(stream_id, b"hello")
    assert link.to_server() == [
        StreamOpenRequested(stream_id, "example.com", 80),
        DataReceived(stream_id, memoryview(b"hello")),
    ]


def test_open_failure_discards_optimistic_data() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.agent.open_stream("example.com", 80)
    link.agent.send_data(stream_id, b"x" * 5000)
    link.to_server()
    assert link.agent.buffered_bytes == 5000 - 1 * KIB
    link.server.reject_stream(stream_id, ErrorCode.DENIED, "private address")
    assert link.to_agent() == [StreamOpenFailed(stream_id, ErrorCode.DENIED, "private address")]
    assert link.agent.buffered_bytes == 0
    assert not link.agent.send_data(stream_id, b"more")


def test_large_write_is_split_into_frames_of_the_peer_max_size() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, bytes(range(256)) * 10)  # 2560 bytes
    sent = data_frames(link.agent.data_to_send())
    assert [len(f[3]) for f in sent] == [1024, 1024, 512]
    assert b"".join(f[3] for f in sent) == bytes(range(256)) * 10


def test_data_to_send_stops_after_its_byte_budget() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"b" * 5000)
    first = data_frames(link.agent.data_to_send(max_bytes=2000))
    assert [len(f[3]) for f in first] == [1024, 1024]
    assert link.agent.has_data_to_send()
    assert link.agent.buffered_bytes == 5000 - 2048
    rest = data_frames(link.agent.data_to_send())
    assert [len(f[3]) for f in rest] == [1024, 1024, 904]
    assert not link.agent.has_data_to_send()


def test_control_frames_go_before_queued_data() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"d" * 3000)
    link.agent.data_to_send(max_bytes=1)
    link.agent.send_ping(b"pingpong")
    kinds = [f[0] for f in decode(link.agent.data_to_send())]
    assert kinds == [FrameType.PING, FrameType.DATA, FrameType.DATA]


def test_empty_write_sends_nothing() -> None:
    link = Link()
    stream_id = link.open()
    assert link.agent.send_data(stream_id, b"")
    assert not link.agent.has_data_to_send()


def test_send_data_on_an_unknown_stream_returns_false() -> None:
    link = Link()
    assert not link.agent.send_data(7, b"lost")
    assert link.agent.pending_bytes(7) == 0
    assert link.agent.buffered_bytes == 0


# --- flow control --------------------------------------------------------------------------------


def test_sender_stops_at_the_peer_window_and_resumes_on_window_update() -> None:
    link = Link(server=SessionSettings(initial_window=4 * KIB, max_frame_size=1 * KIB))
    stream_id = link.open()
    payload = bytes(i % 251 for i in range(10_000))
    link.agent.send_data(stream_id, payload)
    got = received(link.to_server(), stream_id)
    assert got == payload[: 4 * KIB]
    assert link.agent.buffered_bytes == link.agent.pending_bytes(stream_id) == 10_000 - 4 * KIB
    assert not link.agent.has_data_to_send()  # blocked on credit, nothing to write
    link.server.consumed(stream_id, 4 * KIB)
    assert link.to_agent() == []  # a WINDOW frame, no event
    got += received(link.to_server(), stream_id)
    assert got == payload[: 8 * KIB]
    link.server.consumed(stream_id, 4 * KIB)
    _, server_events = link.pump(consume=True)
    assert got + received(server_events, stream_id) == payload
    assert link.agent.buffered_bytes == 0


def test_window_update_returns_credit_after_quarter_window_consumed() -> None:
    link = Link(server=SessionSettings(initial_window=8 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"w" * 8 * KIB)
    link.to_server()
    link.server.consumed(stream_id, 2 * KIB - 1)
    assert link.server.data_to_send() == b""
    link.server.consumed(stream_id, 1)
    assert decode(link.server.data_to_send()) == [
        (FrameType.WINDOW, 0, stream_id, frames.window_payload(2 * KIB))
    ]
    link.server.consumed(stream_id, 3 * KIB)
    assert decode(link.server.data_to_send()) == [
        (FrameType.WINDOW, 0, stream_id, frames.window_payload(3 * KIB))
    ]


def test_data_beyond_credit_is_a_flow_control_error() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.server.receive_data(raw(FrameType.DATA, stream_id, b"a" * 1000))
    with pytest.raises(ProtocolError, match="25 bytes with 24 of credit") as caught:
        link.server.receive_data(raw(FrameType.DATA, stream_id, b"a" * 25))
    assert caught.value.code is ErrorCode.FLOW_CONTROL
    assert goaway_sent_by(link.server)[:2] == (stream_id, ErrorCode.FLOW_CONTROL)


def test_returned_credit_allows_exactly_that_much_more() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.server.receive_data(raw(FrameType.DATA, stream_id, b"a" * 1024))
    link.server.consumed(stream_id, 256)
    link.server.receive_data(raw(FrameType.DATA, stream_id, b"a" * 256))
    with pytest.raises(ProtocolError, match="1 bytes with 0 of credit"):
        link.server.receive_data(raw(FrameType.DATA, stream_id, b"a"))


def test_no_credit_is_returned_after_the_peer_ended() -> None:
    link = Link(server=SessionSettings(initial_window=4 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"z" * 4 * KIB)
    link.agent.end_stream(stream_id)
    assert StreamEnded(stream_id) in link.to_server()
    link.server.consumed(stream_id, 4 * KIB)
    assert link.server.data_to_send() == b""


def test_window_credit_overflow_is_a_flow_control_error() -> None:
    link = Link()
    stream_id = link.open()
    increment = frames.window_payload(frames.MAX_WINDOW)
    with pytest.raises(ProtocolError, match="credit overflow") as caught:
        link.agent.receive_data(raw(FrameType.WINDOW, stream_id, increment))
    assert caught.value.code is ErrorCode.FLOW_CONTROL


def test_zero_window_increment_is_a_flow_control_error() -> None:
    link = Link()
    stream_id = link.open()
    with pytest.raises(ProtocolError) as caught:
        link.agent.receive_data(raw(FrameType.WINDOW, stream_id, b"\x00" * 4))
    assert caught.value.code is ErrorCode.FLOW_CONTROL


def test_window_for_the_link_as_a_whole_is_a_protocol_error() -> None:
    link = Link()
    with pytest.raises(ProtocolError, match="stream 0, which was never opened"):
        link.agent.receive_data(raw(FrameType.WINDOW, 0, frames.window_payload(100)))


# --- scheduling ----------------------------------------------------------------------------------


def test_round_robin_interleaves_two_busy_streams() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    first, second = link.open(), link.open()
    link.agent.send_data(first, b"1" * 4 * KIB)
    link.agent.send_data(second, b"2" * 4 * KIB)
    sent = data_frames(link.agent.data_to_send())
    assert [f[2] for f in sent] == [first, second] * 4
    assert all(len(f[3]) == 1 * KIB for f in sent)


def test_round_robin_takes_one_frame_per_stream_per_turn() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    a, b, c = link.open(), link.open(), link.open()
    link.agent.send_data(a, b"a" * 3 * KIB)
    link.agent.send_data(b, b"b" * 100)
    link.agent.send_data(c, b"c" * 2 * KIB)
    sent = data_frames(link.agent.data_to_send())
    assert [(f[2], len(f[3])) for f in sent] == [
        (a, 1024),
        (b, 100),
        (c, 1024),
        (a, 1024),
        (c, 1024),
        (a, 1024),
    ]


def test_stream_without_credit_does_not_stall_the_others() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB, max_frame_size=1 * KIB))
    slow, fast = link.open(), link.open()
    link.agent.send_data(slow, b"s" * 5 * KIB)  # the server never consumes this stream
    for _ in range(5):
        link.agent.send_data(fast, b"f" * 1 * KIB)
        events = link.to_server()
        assert received(events, fast) == b"f" * 1 * KIB
        link.server.consumed(fast, 1 * KIB)
        link.to_agent()
    assert link.agent.pending_bytes(slow) == 4 * KIB


# --- ending and resetting ------------------------------------------------------------------------


def test_end_stream_is_sent_after_queued_data() -> None:
    link = Link(server=SessionSettings(max_frame_size=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"e" * 2500)
    link.agent.end_stream(stream_id)
    sent = data_frames(link.agent.data_to_send())
    assert [(f[1], len(f[3])) for f in sent] == [
        (0, 1024),
        (0, 1024),
        (frames.FLAG_END_STREAM, 452),
    ]


def test_end_stream_waits_for_credit_to_send_the_queued_data() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"e" * 1500)
    link.agent.end_stream(stream_id)
    events = link.to_server()
    assert received(events, stream_id) == b"e" * 1024
    assert StreamEnded(stream_id) not in events
    link.server.consumed(stream_id, 1024)
    link.to_agent()
    events = link.to_server()
    assert events == [DataReceived(stream_id, memoryview(b"e" * 476)), StreamEnded(stream_id)]


def test_end_stream_without_queued_data_sends_an_empty_end_frame() -> None:
    link = Link()
    stream_id = link.open()
    link.agent.end_stream(stream_id)
    link.agent.end_stream(stream_id)  # idempotent
    assert decode(link.agent.data_to_send()) == [
        (FrameType.DATA, frames.FLAG_END_STREAM, stream_id, b"")
    ]


def test_end_stream_needs_no_credit() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"x" * 1 * KIB)
    link.to_server()
    link.agent.end_stream(stream_id)
    assert link.to_server() == [StreamEnded(stream_id)]


def test_send_after_end_is_refused() -> None:
    link = Link()
    stream_id = link.open()
    link.agent.end_stream(stream_id)
    assert not link.agent.send_data(stream_id, b"too late")


def test_half_closed_stream_still_carries_the_other_direction() -> None:
    link = Link()
    stream_id = link.open()
    link.agent.send_data(stream_id, b"request")
    link.agent.end_stream(stream_id)
    assert link.to_server() == [
        DataReceived(stream_id, memoryview(b"request")),
        StreamEnded(stream_id),
    ]
    assert link.server.send_data(stream_id, b"response part 1")
    assert link.server.send_data(stream_id, b", part 2")
    assert received(link.to_agent(), stream_id) == b"response part 1, part 2"
    assert link.agent.has_stream(stream_id) and link.server.has_stream(stream_id)


def test_stream_is_forgotten_once_both_sides_ended() -> None:
    link = Link()
    stream_id = link.open()
    link.agent.end_stream(stream_id)
    link.server.end_stream(stream_id)
    agent_events, server_events = link.pump()
    assert agent_events == [StreamEnded(stream_id)]
    assert server_events == [StreamEnded(stream_id)]
    assert link.agent.open_streams == link.server.open_streams == 0


def test_data_after_end_is_a_protocol_error() -> None:
    link = Link()
    stream_id = link.open()
    link.server.receive_data(raw(FrameType.DATA, stream_id, b"", flags=frames.FLAG_END_STREAM))
    with pytest.raises(ProtocolError, match="after its end"):
        link.server.receive_data(raw(FrameType.DATA, stream_id, b"more"))


def test_reset_drops_queued_bytes() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.agent.send_data(stream_id, b"r" * 5000)
    link.to_server()
    link.agent.send_data(stream_id, b"more")
    assert link.agent.buffered_bytes == 5000 - 1024 + 4
    link.agent.reset_stream(stream_id, ErrorCode.CANCELLED, "client went away")
    assert link.agent.buffered_bytes == 0
    assert link.agent.pending_bytes(stream_id) == 0
    assert not link.agent.has_stream(stream_id)
    assert decode(link.agent.data_to_send()) == [
        (
            FrameType.RESET,
            0,
            stream_id,
            frames.code_payload(ErrorCode.CANCELLED, "client went away"),
        )
    ]


def test_reset_is_reported_to_the_peer_and_discards_its_queue() -> None:
    link = Link(agent=SessionSettings(initial_window=1 * KIB))
    stream_id = link.open()
    link.server.send_data(stream_id, b"s" * 3000)
    link.to_agent()
    assert link.server.buffered_bytes == 3000 - 1024
    link.agent.reset_stream(stream_id, ErrorCode.CANCELLED)
    assert link.to_server() == [StreamReset(stream_id, ErrorCode.CANCELLED, "")]
    assert link.server.buffered_bytes == 0
    assert not link.server.send_data(stream_id, b"x")


def test_late_frames_for_reset_stream_are_ignored() -> None:
    link = Link()
    stream_id = link.open()
    link.agent.send_data(stream_id, b"req")
    link.to_server()
    # The server answers while the agent resets: both messages cross on the wire.
    link.server.send_data(stream_id, b"answer")
    link.server.consumed(stream_id, 3)
    link.server.end_stream(stream_id)
    in_flight = link.server.data_to_send()
    link.agent.reset_stream(stream_id, ErrorCode.CANCELLED)
    assert link.agent.receive_data(in_flight) == []
    late = raw(FrameType.WINDOW, stream_id, frames.window_payload(10)) + raw(
        FrameType.RESET, stream_id, b"\x09"
    )
    assert link.agent.receive_data(late) == []
    assert not link.agent.failed
    assert link.to_server() == [StreamReset(stream_id, ErrorCode.CANCELLED, "")]
    assert link.server.open_streams == 0


def test_late_open_result_for_reset_stream_is_ignored() -> None:
    link = Link()
    stream_id = link.agent.open_stream("example.com", 443)
    link.to_server()
    link.agent.reset_stream(stream_id, ErrorCode.CANCELLED)
    link.server.reject_stream(stream_id, ErrorCode.TIMEOUT)
    assert link.to_agent() == []
    assert link.to_server() == []  # the RESET for a stream the server already forgot
    assert not link.agent.failed and not link.server.failed


def test_optimistic_data_for_a_refused_stream_is_ignored() -> None:
    link = Link(server=SessionSettings(max_streams=1))
    link.open()
    refused = link.agent.open_stream("example.com", 443)
    link.agent.send_data(refused, b"early")
    link.agent.end_stream(refused)
    assert link.to_server() == []
    assert link.to_agent() == [
        StreamOpenFailed(refused, ErrorCode.LIMIT, "stream limit of 1 per link reached")
    ]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw(FrameType.DATA, 5, b"x"), id="DATA"),
        pytest.param(raw(FrameType.WINDOW, 5, frames.window_payload(1)), id="WINDOW"),
        pytest.param(raw(FrameType.RESET, 5, b"\x09"), id="RESET"),
        pytest.param(raw(FrameType.OPEN_RESULT, 5, b"\x00"), id="OPEN_RESULT"),
        pytest.param(raw(FrameType.DATA, 0, b"x"), id="DATA-on-0"),
        pytest.param(raw(FrameType.RESET, 0, b"\x09"), id="RESET-on-0"),
    ],
)
def test_frames_for_never_opened_stream_are_protocol_errors(frame: bytes) -> None:
    link = Link()
    link.open()  # stream 1 exists; 5 was never opened
    with pytest.raises(ProtocolError, match="never opened"):
        link.agent.receive_data(frame)
    assert link.agent.failed


@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.WINDOW, FrameType.RESET])
def test_server_rejects_frames_for_streams_the_agent_never_opened(frame_type: FrameType) -> None:
    link = Link()
    link.open()
    payload = frames.window_payload(1) if frame_type == FrameType.WINDOW else b"\x00"
    with pytest.raises(ProtocolError, match="stream 2, which was never opened"):
        link.server.receive_data(raw(frame_type, 2, payload))


# --- ping and goaway -----------------------------------------------------------------------------


def test_ping_is_answered_with_ack() -> None:
    link = Link()
    link.agent.send_ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert link.to_server() == []
    assert decode(link.server.data_to_send()) == [
        (FrameType.PING, frames.FLAG_ACK, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07")
    ]
    link.server.send_ping(b"server!!")
    link.agent.send_ping(b"agent!!!")
    agent_events, server_events = link.pump()
    assert agent_events == [PongReceived(b"agent!!!")]
    assert server_events == [PongReceived(b"server!!")]


def test_ping_payload_must_be_eight_bytes() -> None:
    link = Link()
    with pytest.raises(ValueError, match="8 bytes"):
        link.agent.send_ping(b"short")


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw(FrameType.PING, 0, b"1234567"), id="short"),
        pytest.param(raw(FrameType.PING, 0, b"123456789"), id="long"),
        pytest.param(raw(FrameType.PING, 1, b"12345678"), id="on-a-stream"),
    ],
)
def test_malformed_ping_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed PING"):
        server_after_hello().receive_data(frame)


def test_goaway_makes_server_refuse_new_streams() -> None:
    link = Link()
    kept = link.open()
    in_flight = link.agent.open_stream("example.com", 443)
    opening = link.agent.data_to_send()
    link.server.send_goaway()
    assert link.server.goaway_sent
    link.server.receive_data(opening)  # this OPEN crossed the GOAWAY on the wire
    agent_events = link.to_agent()
    assert agent_events == [
        GoAwayReceived(kept, ErrorCode.GOING_AWAY, ""),
        StreamOpenFailed(
            in_flight, ErrorCode.GOING_AWAY, "server is shutting down; retry on a new link"
        ),
    ]
    assert link.server.stream_ids() == [kept]
    with pytest.raises(SessionStateError, match="going away"):
        link.agent.open_stream("example.com", 443)


def test_streams_keep_working_after_goaway_until_they_finish() -> None:
    link = Link()
    stream_id = link.open()
    link.server.send_goaway(ErrorCode.GOING_AWAY, "deploying")
    assert link.to_agent() == [GoAwayReceived(stream_id, ErrorCode.GOING_AWAY, "deploying")]
    link.agent.send_data(stream_id, b"still here")
    link.agent.end_stream(stream_id)
    link.server.send_data(stream_id, b"still here too")
    link.server.end_stream(stream_id)
    agent_events, server_events = link.pump()
    assert received(agent_events, stream_id) == b"still here too"
    assert received(server_events, stream_id) == b"still here"
    assert link.agent.open_streams == link.server.open_streams == 0


def test_goaway_is_sent_once() -> None:
    link = Link()
    link.server.send_goaway(ErrorCode.GOING_AWAY, "first")
    link.server.send_goaway(ErrorCode.INTERNAL, "second")
    assert goaway_sent_by(link.server) == (0, ErrorCode.GOING_AWAY, "first")
    assert link.server.data_to_send() == b""


def test_protocol_error_after_graceful_goaway_sends_no_second_goaway() -> None:
    link = Link()
    link.server.send_goaway()
    link.server.data_to_send()
    with pytest.raises(ProtocolError):
        link.server.receive_data(raw(FrameType.DATA, 9, b"x"))
    assert link.server.data_to_send() == b""


def test_agent_may_not_open_after_a_protocol_error() -> None:
    link = Link()
    with pytest.raises(ProtocolError):
        link.agent.receive_data(raw(FrameType.PING, 0, b""))
    with pytest.raises(SessionStateError):
        link.agent.open_stream("example.com", 443)


# --- bookkeeping ---------------------------------------------------------------------------------


def test_take_drained_reports_streams_whose_queue_emptied() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    small, big = link.open(), link.open()
    link.agent.send_data(small, b"s" * 100)
    link.agent.send_data(big, b"b" * 2000)
    link.to_server()
    assert link.agent.take_drained() == [small]
    assert link.agent.take_drained() == []
    link.server.consumed(big, 1024)
    link.to_agent()
    link.to_server()
    assert link.agent.take_drained() == [big]
    assert link.agent.buffered_bytes == 0


def test_buffered_bytes_is_the_sum_of_stream_queues() -> None:
    link = Link(server=SessionSettings(initial_window=1 * KIB))
    a, b = link.open(), link.open()
    link.agent.send_data(a, b"a" * 3000)
    link.agent.send_data(b, b"b" * 1500)
    assert link.agent.buffered_bytes == 4500
    link.to_server()
    assert link.agent.pending_bytes(a) == 3000 - 1024
    assert link.agent.pending_bytes(b) == 1500 - 1024
    assert link.agent.buffered_bytes == 4500 - 2048


def test_received_events_follow_the_wire_order() -> None:
    link = Link()
    a, b = link.open(), link.open()
    link.agent.send_data(a, b"1")
    link.agent.send_data(b, b"2")
    link.agent.end_stream(a)
    link.agent.send_data(b, b"3")
    # Each write leaves as its own frame; the END rides on the stream's last DATA frame.
    sent = link.agent.data_to_send()
    assert decode(sent) == [
        (FrameType.DATA, frames.FLAG_END_STREAM, a, b"1"),
        (FrameType.DATA, 0, b, b"2"),
        (FrameType.DATA, 0, b, b"3"),
    ]
    assert link.server.receive_data(sent) == [
        DataReceived(a, memoryview(b"1")),
        StreamEnded(a),
        DataReceived(b, memoryview(b"2")),
        DataReceived(b, memoryview(b"3")),
    ]


# --- keepalive -----------------------------------------------------------------------------------


def test_keepalive_pings_every_interval() -> None:
    keepalive = Keepalive(interval=15, timeout=30, now=100.0)
    assert keepalive.poll(100.0) is KeepaliveAction.NONE
    assert keepalive.poll(114.9) is KeepaliveAction.NONE
    keepalive.received(114.9)
    assert keepalive.poll(115.0) is KeepaliveAction.PING
    assert keepalive.poll(115.1) is KeepaliveAction.NONE
    keepalive.received(129.0)
    assert keepalive.poll(130.0) is KeepaliveAction.PING


def test_keepalive_declares_a_silent_link_dead_after_timeout() -> None:
    keepalive = Keepalive(interval=15, timeout=30, now=0.0)
    assert keepalive.poll(15.0) is KeepaliveAction.PING
    assert keepalive.poll(29.9) is KeepaliveAction.NONE
    assert keepalive.poll(30.0) is KeepaliveAction.DEAD
    assert keepalive.poll(31.0) is KeepaliveAction.DEAD


def test_keepalive_any_received_bytes_keep_the_link_alive() -> None:
    keepalive = Keepalive(interval=15, timeout=30, now=0.0)
    for now in range(10, 200, 10):
        keepalive.received(float(now))
        assert keepalive.poll(float(now) + 5) is not KeepaliveAction.DEAD


def test_keepalive_next_check_is_the_earlier_of_ping_and_timeout() -> None:
    keepalive = Keepalive(interval=15, timeout=30, now=0.0)
    assert keepalive.next_check(0.0) == 15.0
    assert keepalive.next_check(10.0) == 5.0
    assert keepalive.poll(15.0) is KeepaliveAction.PING
    assert keepalive.next_check(15.0) == 15.0  # both the next PING and the timeout are at 30
    keepalive.received(20.0)
    assert keepalive.next_check(20.0) == 10.0  # next PING at 30
    assert keepalive.poll(30.0) is KeepaliveAction.PING
    assert keepalive.next_check(30.0) == 15.0  # next PING at 45, death at 50
    assert keepalive.next_check(60.0) == 0.0  # overdue is never negative
    short_timeout = Keepalive(interval=15, timeout=5, now=0.0)
    assert short_timeout.next_check(1.0) == 4.0


@pytest.mark.parametrize(("interval", "timeout"), [(0, 30), (15, 0), (-1, 30), (15, -5)])
def test_keepalive_refuses_non_positive_durations(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Keepalive(interval, timeout, now=0.0)
