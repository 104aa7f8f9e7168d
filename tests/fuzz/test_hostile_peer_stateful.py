"""Hypothesis stateful test: one session, its own application's calls, and a hostile peer.

tests/unit/test_wire_properties.py already drives two well-behaved sessions through random
operations (LinkMachine) and feeds garbage to a freshly set-up session. What it does not do is
interleave the two: a peer that misbehaves *while* the application opens, writes, consumes and
resets streams. This machine does, and checks after every step that only ProtocolError escapes,
that a failed session has queued a GOAWAY and ignores further input, and that memory stays
bounded (queues add up, no stream holds more than its window unconsumed, the server never holds
more than max_streams).
"""

from __future__ import annotations

import contextlib

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fluidity.wire import frames
from fluidity.wire.events import DataReceived, StreamEnded, StreamReset
from fluidity.wire.frames import ErrorCode, FrameReader, FrameType, ProtocolError
from fluidity.wire.session import Role, Session, SessionSettings, SessionStateError

WINDOW = 1024
MAX_STREAMS = 3
HELLO = frames.encode(FrameType.HELLO, 0, 0, frames.hello_payload(1, WINDOW, 1024))
stream_ids = st.integers(0, 5)


@st.composite
def peer_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([*FrameType, 9]))
    stream_id = draw(stream_ids)
    flags = draw(st.sampled_from([0, 1, 255]))
    payload = draw(
        st.one_of(
            st.binary(max_size=40),
            st.integers(0, 1024).map(lambda n: b"p" * n),
            st.integers(1, frames.MAX_WINDOW).map(frames.window_payload),
            st.integers(1, 65535).map(lambda port: frames.open_payload("example.com", port)),
            st.sampled_from(ErrorCode).map(frames.code_payload),
        )
    )
    return frames.header(kind, flags, stream_id, len(payload)) + payload


class HostilePeerMachine(RuleBasedStateMachine):
    @initialize(role=st.sampled_from(Role), hello=st.booleans())
    def setup(self, role: Role, hello: bool) -> None:
        self.role = role
        self.session = Session(role, SessionSettings(WINDOW, 1024, MAX_STREAMS))
        self.unconsumed: dict[int, int] = {}
        self.error: ProtocolError | None = None
        self.sent = b""
        self.goaway_codes: list[ErrorCode] = []
        if hello:
            self.session.receive_data(HELLO)

    def _receive(self, data: bytes) -> None:
        try:
            events = self.session.receive_data(data)
        except ProtocolError as exc:
            self.error = exc
            return
        if self.error is not None:
            assert events == [], "a failed session produced events"
        for event in events:
            if type(event) is DataReceived:
                total = self.unconsumed.get(event.stream_id, 0) + len(event.data)
                self.unconsumed[event.stream_id] = total
            elif type(event) in (StreamEnded, StreamReset):
                self.unconsumed.pop(event.stream_id, None)

    @rule(data=peer_frames())
    def peer_sends_a_frame(self, data: bytes) -> None:
        self._receive(data)

    @rule(data=st.binary(max_size=30))
    def peer_sends_bytes(self, data: bytes) -> None:
        self._receive(data)

    @rule()
    def app_opens(self) -> None:
        with contextlib.suppress(SessionStateError):  # before HELLO or after a failure
            self.session.open_stream("example.com", 443)

    @rule(stream_id=stream_ids, size=st.integers(0, 3000))
    def app_writes(self, stream_id: int, size: int) -> None:
        self.session.send_data(stream_id, b"d" * size)

    @rule(stream_id=stream_ids)
    def app_ends(self, stream_id: int) -> None:
        self.session.end_stream(stream_id)

    @rule(stream_id=stream_ids)
    def app_resets(self, stream_id: int) -> None:
        self.session.reset_stream(stream_id, ErrorCode.CANCELLED)
        self.unconsumed.pop(stream_id, None)

    @rule(stream_id=stream_ids, fraction=st.floats(0, 1))
    def app_consumes(self, stream_id: int, fraction: float) -> None:
        n = int(self.unconsumed.get(stream_id, 0) * fraction)
        self.session.consumed(stream_id, n)
        if stream_id in self.unconsumed:
            self.unconsumed[stream_id] -= n

    @rule(max_bytes=st.sampled_from([1, 700, 1 << 20]))
    def app_flushes(self, max_bytes: int) -> None:
        self.sent += self.session.data_to_send(max_bytes)

    @invariant()
    def only_well_formed_frames_leave(self) -> None:
        self.sent += self.session.data_to_send()
        sent = FrameReader(frames.MAX_FRAME_PAYLOAD).feed(self.sent)
        for kind, _, _, payload in sent:
            if kind == FrameType.GOAWAY:
                self.goaway_codes.append(frames.parse_goaway(payload)[1])
        if self.error is not None:
            assert self.session.failed
            assert self.error.code in self.goaway_codes, "a protocol error without its GOAWAY"
            assert self.session.receive_data(HELLO) == []
        self.sent = b""  # data_to_send() always returns whole frames

    @invariant()
    def memory_stays_bounded(self) -> None:
        session = self.session
        queued = sum(session.pending_bytes(s) for s in session.stream_ids())
        assert queued == session.buffered_bytes
        assert all(n <= WINDOW for n in self.unconsumed.values()), self.unconsumed
        if self.role is Role.SERVER:
            assert session.open_streams <= MAX_STREAMS


HostilePeerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_hostile_peer_interleaved_with_application_calls = HostilePeerMachine.TestCase
