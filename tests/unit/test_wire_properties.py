"""Property tests for the wire protocol: codecs round-trip, garbage only ever raises ProtocolError,
and two sessions driven through random operations keep their credit, queue and delivery promises.
"""

from __future__ import annotations

import contextlib
import random
import sys

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

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
from fluidity.wire.frames import (
    MAX_FRAME_PAYLOAD,
    MAX_MESSAGE_LENGTH,
    MAX_STREAM_ID,
    MAX_WINDOW,
    ErrorCode,
    FrameReader,
    FrameType,
    ProtocolError,
)
from fluidity.wire.session import Role, Session, SessionSettings

Frame = tuple[int, int, int, bytes]

# --- strategies ----------------------------------------------------------------------------------

hosts = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)
ports = st.integers(1, 65535)
codes = st.sampled_from(ErrorCode)
messages = st.text(max_size=300)
stream_ids = st.integers(0, MAX_STREAM_ID)


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    """A frame whose payload is a valid encoding for its type (or an unknown type)."""
    kind = draw(st.sampled_from([*FrameType, 99]))
    stream_id = draw(stream_ids)
    flags = 0
    if kind == FrameType.HELLO:
        payload = frames.hello_payload(
            draw(st.integers(0, 65535)),
            draw(st.integers(1, MAX_WINDOW)),
            draw(st.integers(1024, MAX_FRAME_PAYLOAD)),
        )
    elif kind == FrameType.OPEN:
        payload = frames.open_payload(draw(hosts), draw(ports))
    elif kind in (FrameType.OPEN_RESULT, FrameType.RESET):
        payload = frames.code_payload(draw(codes), draw(messages))
    elif kind == FrameType.DATA:
        flags = draw(st.sampled_from([0, frames.FLAG_END_STREAM]))
        payload = draw(st.binary(max_size=300))
    elif kind == FrameType.WINDOW:
        payload = frames.window_payload(draw(st.integers(1, MAX_WINDOW)))
    elif kind == FrameType.PING:
        flags = draw(st.sampled_from([0, frames.FLAG_ACK]))
        payload = draw(st.binary(min_size=8, max_size=8))
    elif kind == FrameType.GOAWAY:
        payload = frames.goaway_payload(draw(stream_ids), draw(codes), draw(messages))
    else:
        flags = draw(st.integers(0, 255))
        payload = draw(st.binary(max_size=50))
    return int(kind), flags, stream_id, payload


def feed_in_pieces(reader: FrameReader, data: bytes, sizes: list[int]) -> list[Frame]:
    out: list[Frame] = []
    pos = 0
    for size in [*sizes, len(data)]:
        piece = data[pos : pos + size]
        pos += len(piece)
        out += [(t, f, s, bytes(p)) for t, f, s, p in reader.feed(piece)]
    return out


# --- (a) valid frames round-trip -----------------------------------------------------------------


@given(st.lists(valid_frames(), max_size=12), st.lists(st.integers(0, 80), max_size=30))
@settings(deadline=None, max_examples=200)
def test_valid_frames_decode_to_themselves_however_chunked(
    sent: list[Frame], sizes: list[int]
) -> None:
    data = b"".join(frames.encode(t, f, s, p) for t, f, s, p in sent)
    reader = FrameReader()
    assert feed_in_pieces(reader, data, sizes) == sent
    assert reader.buffered == 0


@given(st.integers(0, 65535), st.integers(1, MAX_WINDOW), st.integers(1024, MAX_FRAME_PAYLOAD))
def test_hello_codec_round_trips(version: int, window: int, max_frame: int) -> None:
    assert frames.parse_hello(frames.hello_payload(version, window, max_frame)) == (
        version,
        window,
        max_frame,
    )


@given(hosts, ports)
def test_open_codec_round_trips(host: str, port: int) -> None:
    assume(" " not in host)
    assert frames.parse_open(frames.open_payload(host, port)) == (host, port)


@given(st.text(max_size=300), ports)
def test_open_payload_never_encodes_what_parse_open_refuses(host: str, port: int) -> None:
    try:
        payload = frames.open_payload(host, port)
    except ValueError:
        return
    parsed_host, parsed_port = frames.parse_open(payload)
    assert parsed_port == port
    if host.isascii():
        assert parsed_host == host


@given(codes, st.text(max_size=700))
def test_code_codec_round_trips_and_truncates_messages(code: ErrorCode, message: str) -> None:
    parsed_code, parsed = frames.parse_code(frames.code_payload(code, message))
    assert parsed_code is code
    if len(message.encode()) <= MAX_MESSAGE_LENGTH:
        assert parsed == message
    else:
        assert message.startswith(parsed)
        assert MAX_MESSAGE_LENGTH - 4 < len(parsed.encode()) <= MAX_MESSAGE_LENGTH


@given(st.integers(1, MAX_WINDOW))
def test_window_codec_round_trips(increment: int) -> None:
    assert frames.parse_window(frames.window_payload(increment)) == increment


@given(stream_ids, codes, messages)
def test_goaway_codec_round_trips(last: int, code: ErrorCode, message: str) -> None:
    assert frames.parse_goaway(frames.goaway_payload(last, code, message)) == (last, code, message)


# --- (b) garbage only ever raises ProtocolError --------------------------------------------------


@given(st.lists(st.binary(max_size=40), max_size=20), st.sampled_from([1024, MAX_FRAME_PAYLOAD]))
@settings(deadline=None, max_examples=300)
def test_frame_reader_on_arbitrary_bytes_raises_only_protocol_error(
    pieces: list[bytes], limit: int
) -> None:
    reader = FrameReader(limit)
    consumed = 0
    try:
        for piece in pieces:
            for _, _, _, payload in reader.feed(piece):
                consumed += frames.HEADER_SIZE + len(payload)
    except ProtocolError:
        return
    assert consumed + reader.buffered == sum(map(len, pieces))
    assert reader.buffered < frames.HEADER_SIZE + limit


@given(st.binary(max_size=600))
def test_payload_parsers_on_arbitrary_bytes_raise_only_protocol_error(payload: bytes) -> None:
    for parse in (
        frames.parse_hello,
        frames.parse_open,
        frames.parse_code,
        frames.parse_window,
        frames.parse_goaway,
        frames.parse_frame_size,
    ):
        for form in (payload, memoryview(payload)):
            with contextlib.suppress(ProtocolError):
                parse(form)


@st.composite
def frame_like_bytes(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers and arbitrary or near-valid payloads; lengths may lie."""
    kind = draw(st.sampled_from([*FrameType, 8, 200]))
    flags = draw(st.sampled_from([0, 1, 2, 255]))
    stream_id = draw(st.sampled_from([0, 1, 2, 3, 7, MAX_STREAM_ID]))
    payload = draw(
        st.one_of(
            st.binary(max_size=40),
            valid_frames().map(lambda frame: frame[3]),
            st.just(frames.window_payload(MAX_WINDOW)),
            st.just(frames.hello_payload(1, 1024, 1024)),
        )
    )
    length = draw(
        st.one_of(st.just(len(payload)), st.integers(0, 70), st.integers(0, (1 << 32) - 1))
    )
    return frames.header(kind, flags, stream_id, length) + payload


def fuzzed_session(role: Role, open_streams: int) -> Session:
    session = Session(
        role, SessionSettings(initial_window=1024, max_frame_size=1024, max_streams=2)
    )
    session.data_to_send()
    session.receive_data(frames.encode(FrameType.HELLO, 0, 0, frames.hello_payload(1, 1024, 1024)))
    if role is Role.AGENT:
        for _ in range(open_streams):
            stream_id = session.open_stream("example.com", 443)
            session.send_data(stream_id, b"x" * 2000)
    else:
        for stream_id in range(1, open_streams + 1):
            payload = frames.open_payload("example.com", 443)
            session.receive_data(frames.encode(FrameType.OPEN, 0, stream_id, payload))
    session.data_to_send()
    return session


@given(
    st.sampled_from(Role),
    st.integers(0, 2),
    st.lists(st.one_of(frame_like_bytes(), st.binary(max_size=30)), max_size=12),
    st.lists(st.integers(0, 60), max_size=10),
)
@settings(deadline=None, max_examples=400)
def test_session_fed_garbage_raises_only_protocol_error(
    role: Role, open_streams: int, chunks: list[bytes], sizes: list[int]
) -> None:
    session = fuzzed_session(role, open_streams)
    data = b"".join(chunks)
    pos = 0
    try:
        for size in [*sizes, len(data)]:
            piece = data[pos : pos + size]
            pos += len(piece)
            session.receive_data(piece)
            FrameReader().feed(session.data_to_send())  # whatever it answers is well formed
    except ProtocolError as exc:
        assert session.failed
        sent = FrameReader().feed(session.data_to_send())
        goaways = [frames.parse_goaway(p) for t, _, _, p in sent if t == FrameType.GOAWAY]
        assert [code for _, code, _ in goaways] == [exc.code]
        assert session.receive_data(data) == []
    assert session.buffered_bytes == sum(s.pending_bytes for s in session._streams.values())


# --- (c) two sessions through random operations --------------------------------------------------

PEER = {Role.AGENT: Role.SERVER, Role.SERVER: Role.AGENT}
picks = st.integers(0, 1 << 16)
sides = st.sampled_from(Role)
write_sizes = st.one_of(st.integers(0, 64), st.integers(1000, 9000))  # one frame, or several
# How many link bytes one step delivers: a few (split headers), some, or all that is waiting.
pieces = st.one_of(st.integers(1, 12), st.integers(13, 6000), st.just(1 << 30))
opened = Bundle("opened")
MAX_OPENS = 6  # few streams per run, so that rules often pick the same one


class LinkMachine(RuleBasedStateMachine):
    """An agent and a server session joined by two byte pipes that the rules drain in pieces.

    The model keeps, per (sender, stream), the bytes the application queued and the bytes the other
    side's application received, and checks delivery, credit and queue accounting throughout. The
    server application answers open requests when a rule says so; each side's application consumes
    received bytes when a rule says so. Every run ends by settling the link (answer every request,
    move every byte, consume everything) and checking that every stream not reset or refused
    delivered exactly what was sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[Role, Session] = {}
        self.wire: dict[Role, bytearray] = {Role.AGENT: bytearray(), Role.SERVER: bytearray()}
        self.sent: dict[tuple[Role, int], bytearray] = {}  # keyed by the sending side
        self.got: dict[tuple[Role, int], bytearray] = {}  # keyed by the sending side
        self.unconsumed: dict[tuple[Role, int], int] = {}  # keyed by the receiving side
        self.ended: set[tuple[Role, int]] = set()  # the sender called end_stream
        self.end_seen: set[tuple[Role, int]] = set()  # the receiver got StreamEnded
        self.reset_codes: dict[tuple[Role, int], ErrorCode] = {}  # keyed by the resetting side
        self.dead: set[int] = set()  # reset or refused: delivery may stop short
        self.requests: list[int] = []  # open requests the server application has not answered
        self.requested: set[int] = set()
        self.reject_codes: dict[int, ErrorCode] = {}
        self.pings: dict[Role, list[bytes]] = {Role.AGENT: [], Role.SERVER: []}
        self.pongs: dict[Role, int] = {Role.AGENT: 0, Role.SERVER: 0}
        self.goaway_last: int | None = None

    @initialize(
        target=opened,
        agent_window=st.sampled_from([1024, 1536, 4096]),
        server_window=st.sampled_from([1024, 3000, 8192]),
        agent_frame=st.sampled_from([1024, 2048]),
        server_frame=st.sampled_from([1024, 4096]),
        max_streams=st.sampled_from([1, 3, 16]),
        streams=st.integers(1, 3),
    )
    def start(
        self,
        *,
        agent_window: int,
        server_window: int,
        agent_frame: int,
        server_frame: int,
        max_streams: int,
        streams: int,
    ) -> MultipleResults[int]:
        agent_settings = SessionSettings(agent_window, agent_frame)
        self.sessions[Role.AGENT] = Session(Role.AGENT, agent_settings)
        server_settings = SessionSettings(server_window, server_frame, max_streams)
        self.sessions[Role.SERVER] = Session(Role.SERVER, server_settings)
        self.move(Role.AGENT, 1 << 30)
        self.move(Role.SERVER, 1 << 30)
        ids = [self.sessions[Role.AGENT].open_stream("example.com", 443) for _ in range(streams)]
        self.move(Role.AGENT, 1 << 30)
        return multiple(*ids)

    # --- the applications' side of the events ----------------------------------------------------

    def handle(self, receiver: Role, events: list[Event]) -> None:
        sender = PEER[receiver]
        for event in events:
            if isinstance(event, DataReceived):
                key = (sender, event.stream_id)
                assert key not in self.end_seen, "DATA after StreamEnded"
                self.got.setdefault(key, bytearray()).extend(event.data)
                owed = (receiver, event.stream_id)
                self.unconsumed[owed] = self.unconsumed.get(owed, 0) + len(event.data)
            elif isinstance(event, StreamEnded):
                key = (sender, event.stream_id)
                assert key in self.ended, "StreamEnded without end_stream"
                assert self.got.get(key, b"") == self.sent.get(key, b""), "END before all data"
                self.end_seen.add(key)
            elif isinstance(event, StreamReset):
                assert event.code is self.reset_codes[(sender, event.stream_id)]
                self.dead.add(event.stream_id)
            elif isinstance(event, StreamOpenRequested):
                assert receiver is Role.SERVER
                assert event.stream_id not in self.requested
                assert (event.host, event.port) == ("example.com", 443)
                self.requests.append(event.stream_id)
                self.requested.add(event.stream_id)
            elif isinstance(event, StreamOpenFailed):
                if event.stream_id in self.requested:
                    assert event.code is self.reject_codes[event.stream_id]
                else:
                    assert event.code in (ErrorCode.LIMIT, ErrorCode.GOING_AWAY)
                self.dead.add(event.stream_id)
            elif isinstance(event, PongReceived):
                assert event.payload == self.pings[receiver][self.pongs[receiver]]
                self.pongs[receiver] += 1
            elif isinstance(event, GoAwayReceived):
                assert receiver is Role.AGENT
                assert event.last_stream_id == self.goaway_last
            else:
                assert isinstance(event, StreamOpened | LinkReady)

    def consume(self, side: Role, stream_id: int, n: int) -> None:
        self.sessions[side].consumed(stream_id, n)
        self.unconsumed[(side, stream_id)] -= n

    # --- rules -----------------------------------------------------------------------------------

    @precondition(
        lambda self: (
            self.sessions[Role.AGENT].streams_opened < MAX_OPENS
            and not self.sessions[Role.AGENT].goaway_received
        )
    )
    @rule(target=opened)
    def open_stream(self) -> int:
        stream_id = self.sessions[Role.AGENT].open_stream("example.com", 443)
        assert stream_id == self.sessions[Role.AGENT].streams_opened
        return stream_id

    @precondition(lambda self: self.requests)
    @rule(pick=picks, code=st.just(ErrorCode.OK) | codes)
    def answer(self, pick: int, code: ErrorCode) -> None:
        """The server application accepts (code OK) or rejects an open request."""
        stream_id = self.requests.pop(pick % len(self.requests))
        if code is ErrorCode.OK:
            self.sessions[Role.SERVER].accept_stream(stream_id)
        else:
            self.reject_codes[stream_id] = code
            self.sessions[Role.SERVER].reject_stream(stream_id, code, "no")
            self.dead.add(stream_id)

    @rule(side=sides, stream_id=opened, size=write_sizes)
    def send(self, side: Role, stream_id: int, size: int) -> None:
        session = self.sessions[side]
        key = (side, stream_id)
        data = random.Random(f"{key} {len(self.sent.get(key, b''))}").randbytes(size)
        expected = session.has_stream(stream_id) and (side, stream_id) not in self.ended
        assert session.send_data(stream_id, data) == expected
        if expected:
            self.sent.setdefault((side, stream_id), bytearray()).extend(data)

    @rule(pick=picks, fraction=st.floats(0, 1))
    def consume_some(self, pick: int, fraction: float) -> None:
        """An application takes some of the bytes it has received off one stream."""
        owed = [key for key, n in self.unconsumed.items() if n]  # in insertion order
        if owed:
            side, stream_id = owed[pick % len(owed)]
            owed_bytes = self.unconsumed[side, stream_id]
            self.consume(side, stream_id, max(1, int(owed_bytes * fraction)))

    @rule(side=sides, stream_id=opened, reset=st.none() | codes)
    def close(self, side: Role, stream_id: int, reset: ErrorCode | None) -> None:
        """Half-close a stream (``reset`` is None) or reset it with a code."""
        session = self.sessions[side]
        if reset is None:
            if session.has_stream(stream_id):
                self.ended.add((side, stream_id))
            session.end_stream(stream_id)
            return
        if session.has_stream(stream_id):
            self.reset_codes[(side, stream_id)] = reset
            self.dead.add(stream_id)
            if stream_id in self.requests:
                self.requests.remove(stream_id)  # the server application cancels its dial
        session.reset_stream(stream_id, reset, "reset")

    @rule(side=sides, payload=st.binary(min_size=8, max_size=8), goaway=st.integers(0, 7))
    def ping_or_goaway(self, side: Role, payload: bytes, goaway: int) -> None:
        """Send a PING, or now and then (``goaway`` 7, server side) a GOAWAY."""
        server = self.sessions[Role.SERVER]
        if side is Role.SERVER and goaway == 7 and not server.goaway_sent:
            self.goaway_last = server._last_peer_stream
            server.send_goaway()
        else:
            self.sessions[side].send_ping(payload)
            self.pings[side].append(payload)

    @rule(side=sides, n=pieces)
    def move(self, side: Role, n: int) -> None:
        """Take about ``n`` bytes of DATA from ``side``; deliver ``n`` waiting link bytes."""
        self.wire[side] += self.sessions[side].data_to_send(n)
        pipe = self.wire[side]
        if pipe:
            piece = bytes(pipe[:n])
            del pipe[:n]
            receiver = PEER[side]
            self.handle(receiver, self.sessions[receiver].receive_data(piece))

    def settle(self) -> None:
        """Answer every open request, move every byte and consume everything; check delivery."""
        agent, server = self.sessions[Role.AGENT], self.sessions[Role.SERVER]
        for _ in range(10_000):
            while self.requests:
                server.accept_stream(self.requests.pop())
            for side in Role:
                self.move(side, 1 << 30)
            for (side, stream_id), n in list(self.unconsumed.items()):
                if n:
                    self.consume(side, stream_id, n)
            if not (self.requests or agent.has_data_to_send() or server.has_data_to_send()):
                break
        else:
            raise AssertionError("the link never went quiet")
        assert agent.buffered_bytes == server.buffered_bytes == 0
        for key, data in self.sent.items():
            if key[1] not in self.dead:
                assert self.got.get(key, b"") == data, f"{key} delivered short"
        for key in self.ended:
            assert key[1] in self.dead or key in self.end_seen, f"{key} END not delivered"
        assert set(agent.stream_ids()) == set(server.stream_ids())
        for side, stream_id in self.end_seen:
            if (PEER[side], stream_id) in self.end_seen:  # ended both ways: forgotten
                assert not agent.has_stream(stream_id) and not server.has_stream(stream_id)
        for stream_id in agent.stream_ids():
            a, s = agent._streams[stream_id], server._streams[stream_id]
            assert a.send_credit == s.recv_remaining
            assert s.send_credit == a.recv_remaining
        for side in Role:
            assert self.pongs[side] == len(self.pings[side])

    def teardown(self) -> None:
        # Every run ends with the delivery check, unless it already failed: Hypothesis calls
        # teardown in a ``finally`` block, where sys.exc_info() shows the exception in flight.
        if self.sessions and sys.exc_info()[0] is None:
            self.settle()

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def credit_and_queues_are_consistent(self) -> None:
        for side, session in self.sessions.items():
            assert not session.failed
            peer_window = self.sessions[PEER[side]].settings.initial_window
            own_window = session.settings.initial_window
            total = 0
            for stream in session._streams.values():
                assert 0 <= stream.send_credit <= peer_window
                assert 0 <= stream.recv_remaining <= own_window
                assert stream.pending_bytes == sum(len(chunk) for chunk in stream.pending or ())
                total += stream.pending_bytes
                if not stream.remote_ended:
                    owed = self.unconsumed.get((side, stream.id), 0)
                    assert stream.recv_remaining + stream.unacked + owed == own_window
            assert session.buffered_bytes == total
        server = self.sessions[Role.SERVER]
        assert server.open_streams <= server.settings.max_streams

    @invariant()
    def delivered_bytes_are_a_prefix_of_sent_bytes(self) -> None:
        for key, data in self.got.items():
            assert data == self.sent.get(key, b"")[: len(data)], f"{key} out of order"

    @invariant()
    def unconsumed_bytes_fit_the_receive_window(self) -> None:
        for (side, _), n in self.unconsumed.items():
            assert 0 <= n <= self.sessions[side].settings.initial_window


LinkMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestLinkMachine = LinkMachine.TestCase
