"""The link session: streams, credit, scheduling, ping and goaway (sans-I/O, no asyncio).

A :class:`Session` is one side of a link. Feed it the bytes read from the link with
:meth:`Session.receive_data` and act on the events it returns; call its methods to open, write,
end and reset streams; send what :meth:`Session.data_to_send` returns. It never touches a socket,
a clock or a task, so its tests are plain function calls.

Only the agent opens streams (ids 1, 2, 3, ...); the server accepts or rejects them.

Memory bounds (per link):

- receiving: a stream never holds more than its receive window of bytes the application has not
  yet :meth:`~Session.consumed`; a peer that sends more is a protocol error. Windows start at
  ``settings.initial_window``; given a clock, the session grows those that hold their stream back,
  up to ``settings.max_window`` and ``settings.window_growth_budget`` bytes more per link in all
  (:mod:`fluidity.wire.window_tuning`);
- sending: bytes given to :meth:`~Session.send_data` wait in the stream's queue until credit
  allows them out. The session does not cap this queue; the adapter bounds it by pausing its
  source while :meth:`~Session.pending_bytes` is above its own limit (it learns when to resume
  from :meth:`~Session.take_drained`).

Worst case for N streams: ``N * (initial_window + adapter send limit) + window_growth_budget``
bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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
from fluidity.wire.frame_buffer import LARGE_PAYLOAD, BufferedFrameReader, Frame
from fluidity.wire.frames import ErrorCode, FrameType, ProtocolError
from fluidity.wire.window_tuning import WindowTuner

_DATA = FrameType.DATA
_END = frames.FLAG_END_STREAM
_pack_header = frames.HEADER.pack


class Role(Enum):
    AGENT = "agent"  # opens streams
    SERVER = "server"  # accepts streams and dials their targets


class SessionStateError(RuntimeError):
    """The local application used the session wrongly (a bug, not a peer problem)."""


DEFAULT_STREAM_WINDOW = 1024 * 1024
"""Bytes: the default ``initial_window`` (and the config's ``stream_window``)."""
DEFAULT_MAX_FRAME_SIZE = 256 * 1024
"""Bytes: the default ``max_frame_size`` of HELLO and of the config."""
DEFAULT_MAX_STREAM_WINDOW = 32 * 1024 * 1024
"""Bytes: the config's default ``max_stream_window`` (a window the tuner may grow to): enough for
about 670 MB/s at 50 ms, or 1 Gbit/s at 260 ms. The link's budget (64 MiB), not this, bounds
memory. Through a 40 ms relay on loopback one 1 GiB download reached 335 MB/s with 16 MiB and
453 MB/s with 32 MiB (docs/benchmarks.md)."""
DEFAULT_WINDOW_GROWTH_BUDGET = 64 * 1024 * 1024
"""Bytes: the config's default ``stream_window_budget`` (growth of all windows of a link)."""

FLUSH_BURST = 16
"""DATA writes an I/O adapter lets queue before it writes them to the link, instead of waiting for
the end of its event-loop turn.

Writing once per turn coalesces small frames into few TLS records, but a burst read in one turn
(64 keep-alive requests, say) then moves through the peer and the origin as one convoy: each
stage waits for the whole batch of the stage before, and on a small machine a core sits idle.
Writing every few frames lets the stages overlap. wrk c64 on 2 cores, paired runs: 1.4 -> 1.7
cores busy, 6,161 -> 7,786 and 6,782 -> 7,603 requests/s; system calls per request hardly change
(agent: 1.04 -> 1.05 reads, 1.04 -> 1.09 writes, link writes being shared by 16 frames), and CPU
per request stays within the run-to-run noise. A bulk stream, one large frame per read, is not
affected.
"""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Per-link protocol settings announced in HELLO.

    initial_window: bytes the peer may send on one stream before this side returns credit
        (default 1 MiB). Bounds receive memory per stream; throughput per stream is at most
        ``initial_window / round-trip time``, and the round trip that counts includes both
        event loops' turns (about a millisecond under load), so 256 KiB capped one download at
        about 0.7 GB/s on loopback where 1 MiB reaches the CPU limit (docs/benchmarks.md).
    max_frame_size: largest DATA payload this side accepts (bytes, 1 KiB to 1 MiB, default
        256 KiB); the peer's value caps the frames this side sends. Smaller frames interleave
        streams more finely; larger frames cost less CPU per byte (one send to the client and
        one trip through the consumer per frame).
    max_streams: streams the server accepts open at once on one link (default 1024); further
        OPENs get ``LIMIT``. Ignored on the agent.
    max_window: bytes a stream's receive window may grow to when the session is given a clock
        (:mod:`fluidity.wire.window_tuning`). At or below ``initial_window`` (the default, 0)
        windows stay fixed.
    window_growth_budget: bytes all streams of one link may grow their windows by together
        (default 64 MiB); what a stream grew returns to the budget when it can receive no more.
    """

    initial_window: int = DEFAULT_STREAM_WINDOW
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_streams: int = 1024
    max_window: int = 0
    window_growth_budget: int = DEFAULT_WINDOW_GROWTH_BUDGET

    def __post_init__(self) -> None:
        if not 1024 <= self.initial_window <= frames.MAX_WINDOW:
            raise ValueError(f"initial_window must be 1 KiB-2 GiB, got {self.initial_window}")
        if not 1024 <= self.max_frame_size <= frames.MAX_FRAME_PAYLOAD:
            raise ValueError(f"max_frame_size must be 1 KiB-1 MiB, got {self.max_frame_size}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
        if not 0 <= self.max_window <= frames.MAX_WINDOW:
            raise ValueError(f"max_window must be 0-2 GiB, got {self.max_window}")
        if self.window_growth_budget < 0:
            raise ValueError(
                f"window_growth_budget cannot be negative, got {self.window_growth_budget}"
            )

    @property
    def tunes_windows(self) -> bool:
        """Whether windows may grow at all (given a clock)."""
        return self.max_window > self.initial_window and self.window_growth_budget > 0


class _Stream:
    """Book-keeping for one stream; plain slots object because it is touched per frame.

    ``pending`` is created on the first queued chunk and dropped when the queue empties: an empty
    deque costs about 600 bytes, which adds up over thousands of idle streams.
    """

    __slots__ = (
        "closed",
        "credit_batch",
        "end_queued",
        "end_sent",
        "id",
        "in_ready",
        "opened",
        "pending",
        "pending_bytes",
        "received",
        "recv_remaining",
        "remote_ended",
        "send_credit",
        "unacked",
        "withheld",
    )

    def __init__(self, stream_id: int, send_credit: int, recv_window: int, opened: bool) -> None:
        self.id = stream_id
        self.send_credit = send_credit
        self.recv_remaining = recv_window  # bytes the peer may still send
        self.unacked = 0  # bytes consumed by the application, not yet returned as credit
        # Credit goes back in batches of a quarter of the window (see Session.consumed()).
        self.credit_batch = max(1, recv_window // 4)
        self.withheld = 0  # bytes of credit not to return: the window shrank by that much
        self.received = 0  # DATA bytes in all (counted only while windows are tuned)
        self.pending: deque[bytes | memoryview] | None = None
        self.pending_bytes = 0
        self.opened = opened
        self.end_queued = False
        self.end_sent = False
        self.remote_ended = False
        self.in_ready = False
        self.closed = False


class Session:
    """One side of a Fluidity link. See the module docstring for the contract.

    clock: seconds, monotonic (``time.monotonic``). Only needed to grow receive windows
        (``settings.max_window``); without it they stay at ``settings.initial_window``.
    """

    def __init__(
        self,
        role: Role,
        settings: SessionSettings | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.role = role
        self.settings = settings or SessionSettings()
        s = self.settings
        # Credit goes back in batches of a quarter of the initial window (see consumed()).
        self._window_threshold = max(1, s.initial_window // 4)
        self.window_tuner: WindowTuner | None = None
        if clock is not None and s.tunes_windows:
            self.window_tuner = WindowTuner(
                s.initial_window,
                s.max_window,
                s.window_growth_budget,
                clock,
                credit_batch=self._window_threshold,
                max_frame_size=s.max_frame_size,
            )
        self._reader = frames.FrameReader(self.settings.max_frame_size)
        self._buffered_reader = BufferedFrameReader(self.settings.max_frame_size)
        self._streams: dict[int, _Stream] = {}
        self._control: list[bytes | memoryview] = []  # queued control frames, in order
        self._ready: deque[_Stream] = deque()
        self._drained: list[int] = []
        self._next_stream_id = 1
        self._last_peer_stream = 0
        # The agent may send right after OPEN (saves a round trip for plain HTTP); the server
        # sends nothing on a stream before it has accepted it.
        self._sends_before_open = role is Role.AGENT
        self.peer_ready = False
        self.peer_initial_window = 0
        self.peer_max_frame = 0  # bytes: DATA frames this side sends are at most this
        self._hello_max_frame = 0  # what HELLO allowed; FRAME_SIZE may ask for less
        self.goaway_sent = False
        self.goaway_received = False
        self.failed = False
        #: Running totals of DATA payload bytes, for metrics.
        self.bytes_sent = 0
        self.bytes_received = 0
        self.streams_opened = 0
        self._buffered = 0
        self._queue(
            FrameType.HELLO,
            0,
            0,
            frames.hello_payload(frames.PROTOCOL_VERSION, s.initial_window, s.max_frame_size),
        )
        # The session exists before its link is connected; the probe's clock starts when the
        # adapter first takes bytes to write (buffers_to_send).
        self._baseline_unwritten = self.window_tuner is not None
        if self.window_tuner is not None:
            self._queue(FrameType.PING, 0, 0, self.window_tuner.baseline_probe())

    # --- inspection ------------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        """Streams not yet fully closed."""
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in send queues for credit or for :meth:`data_to_send`."""
        return self._buffered

    def pending_bytes(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` waiting to be sent (0 for an unknown or closed stream)."""
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def take_drained(self) -> list[int]:
        """Streams whose send queue became empty since the last call (to resume their sources)."""
        drained, self._drained = self._drained, []
        return drained

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._ready)

    # --- application actions ---------------------------------------------------------------------

    def open_stream(self, host: str, port: int) -> int:
        """Queue an OPEN for ``host:port`` and return the new stream id (agent only).

        Data may be sent on the stream at once; the peer buffers it until the target is dialled.
        """
        if self.role is not Role.AGENT:
            raise SessionStateError("only the agent opens streams")
        if not self.peer_ready:
            raise SessionStateError("cannot open a stream before the peer's HELLO")
        if self.goaway_received or self.failed:
            raise SessionStateError("the link is going away; open the stream on a new link")
        stream_id = self._next_stream_id
        if stream_id > frames.MAX_STREAM_ID:
            raise SessionStateError("stream ids exhausted; reconnect")
        payload = frames.open_payload(host, port)
        self._next_stream_id += 1
        self._streams[stream_id] = _Stream(
            stream_id, self.peer_initial_window, self.settings.initial_window, opened=False
        )
        self.streams_opened += 1
        self._queue(FrameType.OPEN, 0, stream_id, payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Tell the agent the target is connected (server only)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.opened = True
        self._queue(FrameType.OPEN_RESULT, 0, stream_id, frames.code_payload(ErrorCode.OK))
        if stream.pending_bytes or stream.end_queued:
            self._mark_ready(stream)

    def reject_stream(self, stream_id: int, code: ErrorCode, message: str = "") -> None:
        """Tell the agent the open failed and why (server only); forgets the stream."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._discard(stream)
        self._queue(FrameType.OPEN_RESULT, 0, stream_id, frames.code_payload(code, message))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue bytes on a stream; return False (and drop them) if the stream is gone.

        ``data`` is kept by reference until sent, so it must not be mutated afterwards.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return False
        n = len(data)
        if n:
            if stream.pending is None:
                stream.pending = deque()
            stream.pending.append(data)
            stream.pending_bytes += n
            self._buffered += n
            if (
                stream.send_credit > 0
                and not stream.in_ready
                and (stream.opened or self._sends_before_open)
            ):
                stream.in_ready = True
                self._ready.append(stream)
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close: after the queued bytes, tell the peer this side sends no more."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return
        stream.end_queued = True
        if stream.opened or self._sends_before_open:
            self._mark_ready(stream)

    def reset_stream(self, stream_id: int, code: ErrorCode, message: str = "") -> None:
        """Abort a stream in both directions, dropping what is still queued."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._discard(stream)
        self._queue(FrameType.RESET, 0, stream_id, frames.code_payload(code, message))

    def consumed(self, stream_id: int, n: int) -> bool:
        """The application has taken ``n`` received bytes off the stream: return credit.

        Credit goes back in batches (a WINDOW frame once a quarter of the window is used);
        returns True if this call queued one, so the caller knows whether there is anything to
        send.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended:
            return False
        unacked = stream.unacked + n
        if stream.withheld:  # the window shrank: keep this much of the credit back
            kept = min(stream.withheld, unacked)
            stream.withheld -= kept
            unacked -= kept
            if self.window_tuner is not None:
                self.window_tuner.withheld(stream_id, kept)
        if unacked >= stream.credit_batch:
            stream.recv_remaining += unacked
            stream.unacked = 0
            self._control.append(
                _pack_header(4, FrameType.WINDOW, 0, stream_id) + frames.window_payload(unacked)
            )
            return True
        stream.unacked = unacked
        return False

    def send_ping(self, payload: bytes) -> None:
        """Queue a PING carrying 8 opaque bytes (e.g. a timestamp); the answer is a PongReceived."""
        if len(payload) != frames.PING_PAYLOAD_SIZE:
            raise ValueError("ping payload must be 8 bytes")
        self._queue(FrameType.PING, 0, 0, payload)

    def send_goaway(self, code: ErrorCode = ErrorCode.GOING_AWAY, message: str = "") -> None:
        """Announce that no new streams will be accepted (server) or opened (agent)."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        payload = frames.goaway_payload(self._last_peer_stream, code, message)
        self._queue(FrameType.GOAWAY, 0, 0, payload)

    def data_to_send(self, max_bytes: int = 1 << 20) -> bytes:
        """Return the bytes to write to the link now (:meth:`buffers_to_send`, joined)."""
        return b"".join(self.buffers_to_send(max_bytes))

    def buffers_to_send(self, max_bytes: int = 1 << 20) -> list[bytes | memoryview]:
        """Return the buffers to write to the link now, in order (for ``writelines``).

        Control frames come first, then DATA frames taken round-robin from the streams that have
        both queued bytes and credit, at most one frame per stream per turn, so one busy stream
        cannot starve the others. Stops after about ``max_bytes`` of DATA payload; call again while
        :meth:`has_data_to_send` is true.

        Small frames come joined into one buffer (one TLS write, few records); a payload of
        :data:`~fluidity.wire.frame_buffer.LARGE_PAYLOAD` bytes or more comes as it was queued,
        so a bulk stream's bytes are not copied to be joined.
        """
        if self._baseline_unwritten:
            self._baseline_unwritten = False
            if self.window_tuner is not None:
                self.window_tuner.baseline_written()
        done: list[bytes | memoryview] = []
        out = self._control
        self._control = []
        ready = self._ready
        max_frame = self.peer_max_frame
        budget = max_bytes
        sent = 0
        while ready and budget > 0:
            stream = ready.popleft()
            stream.in_ready = False
            if stream.closed:
                continue
            pending = stream.pending
            if pending and stream.send_credit > 0:
                chunk = pending[0]
                n = min(len(chunk), max_frame, stream.send_credit)
                if n == len(chunk):
                    pending.popleft()
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    pending[0] = view[n:]
                    chunk = view[:n]
                stream.send_credit -= n
                stream.pending_bytes -= n
                last = stream.end_queued and not pending
                out.append(_pack_header(n, _DATA, _END if last else 0, stream.id))
                if n >= LARGE_PAYLOAD:
                    done += (b"".join(out), chunk)
                    out = []
                else:
                    out.append(chunk)
                sent += n
                budget -= n
                if not pending:
                    stream.pending = None
                    self._drained.append(stream.id)
                if last:
                    stream.end_sent = True
                    self._maybe_close(stream)
                    continue
            elif stream.end_queued and not pending and not stream.end_sent:
                out.append(_pack_header(0, _DATA, _END, stream.id))
                stream.end_sent = True
                self._maybe_close(stream)
                continue
            if (pending and stream.send_credit > 0) or (stream.end_queued and not pending):
                stream.in_ready = True
                ready.append(stream)
        self._buffered -= sent
        self.bytes_sent += sent
        if out:
            done.append(b"".join(out))
        return done

    # --- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes read from the link; return the events they complete, in order.

        Raises :class:`~fluidity.wire.frames.ProtocolError` if the peer broke the protocol; a
        GOAWAY with the reason is then queued and the link should be closed after sending it.
        """
        if self.failed:
            return []
        return self._receive(lambda: self._reader.feed(data))

    def read_buffer(self) -> memoryview:
        """Where to read the link's next bytes (``asyncio.BufferedProtocol.get_buffer``).

        The alternative to :meth:`receive_data` that saves copies (see
        :mod:`fluidity.wire.frame_buffer`); a session is fed one way or the other, never both.
        """
        return self._buffered_reader.get_buffer()

    def receive_buffered(self, nbytes: int) -> list[Event]:
        """Process ``nbytes`` read into :meth:`read_buffer`; as :meth:`receive_data`."""
        if self.failed:
            return []
        return self._receive(lambda: self._buffered_reader.buffer_updated(nbytes))

    def _receive(self, split: Callable[[], list[Frame]]) -> list[Event]:
        """Handle the frames ``split`` returns (it raises ProtocolError on a bad header)."""
        events: list[Event] = []
        try:
            for frame_type, flags, stream_id, payload in split():
                if frame_type == _DATA:
                    self._on_data(flags, stream_id, payload, events)
                else:
                    self._on_control(frame_type, flags, stream_id, payload, events)
        except ProtocolError as exc:
            self.failed = True
            if not self.goaway_sent:
                self.goaway_sent = True
                self._queue(
                    FrameType.GOAWAY,
                    0,
                    0,
                    frames.goaway_payload(self._last_peer_stream, exc.code, str(exc)),
                )
            raise
        return events

    def _on_data(
        self, flags: int, stream_id: int, payload: memoryview, events: list[Event]
    ) -> None:
        if not self.peer_ready:
            raise ProtocolError("DATA before HELLO")
        stream = self._streams.get(stream_id)
        n = len(payload)
        if stream is None:
            self._check_known(stream_id, "DATA")
            return  # late frame for a stream already reset or refused
        if stream.remote_ended:
            raise ProtocolError(f"DATA on stream {stream_id} after its end")
        if n > stream.recv_remaining:
            raise ProtocolError(
                f"stream {stream_id} sent {n} bytes with {stream.recv_remaining} of credit",
                ErrorCode.FLOW_CONTROL,
            )
        stream.recv_remaining -= n
        self.bytes_received += n
        tuner = self.window_tuner
        if tuner is not None:
            stream.received += n
            probe = tuner.on_data(stream_id, n, stream.received)
            if probe is not None:
                self._queue(FrameType.PING, 0, 0, probe)
        if n:
            events.append(DataReceived(stream_id, payload))
        if flags & _END:
            stream.remote_ended = True
            if tuner is not None:
                tuner.forget(stream_id)
            events.append(StreamEnded(stream_id))
            self._maybe_close(stream)

    def _on_control(
        self, frame_type: int, flags: int, stream_id: int, payload: memoryview, events: list[Event]
    ) -> None:
        if frame_type == FrameType.HELLO:
            if self.peer_ready:
                raise ProtocolError("second HELLO")
            version, window, max_frame = frames.parse_hello(payload)
            if version != frames.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {version}; this side speaks "
                    f"{frames.PROTOCOL_VERSION}: upgrade the older side"
                )
            self.peer_ready = True
            self.peer_initial_window = window
            self._hello_max_frame = min(max_frame, self.settings.max_frame_size)
            self.peer_max_frame = self._hello_max_frame
            events.append(LinkReady(version, window, max_frame))
            return
        if not self.peer_ready:
            raise ProtocolError(f"{_name(frame_type)} before HELLO")
        if frame_type == FrameType.WINDOW:
            increment = frames.parse_window(payload)
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_known(stream_id, "WINDOW")
                return
            stream.send_credit += increment
            if stream.send_credit > frames.MAX_WINDOW:
                raise ProtocolError(f"stream {stream_id} credit overflow", ErrorCode.FLOW_CONTROL)
            if stream.pending and (stream.opened or self._sends_before_open):
                self._mark_ready(stream)
        elif frame_type == FrameType.OPEN:
            self._on_open(stream_id, payload, events)
        elif frame_type == FrameType.OPEN_RESULT:
            self._on_open_result(stream_id, payload, events)
        elif frame_type == FrameType.RESET:
            code, message = frames.parse_code(payload)
            stream = self._streams.pop(stream_id, None)
            if stream is None:
                self._check_known(stream_id, "RESET")
                return
            self._discard(stream)
            events.append(StreamReset(stream_id, code, message))
        elif frame_type == FrameType.PING:
            if stream_id != 0 or len(payload) != frames.PING_PAYLOAD_SIZE:
                raise ProtocolError("malformed PING")
            if flags & frames.FLAG_ACK:
                answer = bytes(payload)
                tuner = self.window_tuner
                changes = tuner.on_pong(answer) if tuner is not None else None
                if changes is None:
                    events.append(PongReceived(answer))
                else:
                    self._resize_windows(changes)
                    frame_size = tuner.take_frame_size() if tuner is not None else None
                    if frame_size is not None:
                        self._queue(
                            FrameType.FRAME_SIZE, 0, 0, frames.frame_size_payload(frame_size)
                        )
            else:
                self._queue(FrameType.PING, frames.FLAG_ACK, 0, bytes(payload))
        elif frame_type == FrameType.FRAME_SIZE:
            if stream_id != 0:
                raise ProtocolError("FRAME_SIZE on a stream")
            self.peer_max_frame = min(frames.parse_frame_size(payload), self._hello_max_frame)
        elif frame_type == FrameType.GOAWAY:
            last, code, message = frames.parse_goaway(payload)
            self.goaway_received = True
            events.append(GoAwayReceived(last, code, message))
        # Unknown frame types are ignored so that later versions can add optional frames.

    def _on_open(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if self.role is not Role.SERVER:
            raise ProtocolError("the server may not open streams")
        if stream_id <= self._last_peer_stream:
            raise ProtocolError(f"stream id {stream_id} is not above {self._last_peer_stream}")
        self._last_peer_stream = stream_id
        host, port = frames.parse_open(payload)
        if self.goaway_sent:
            self._queue(
                FrameType.OPEN_RESULT,
                0,
                stream_id,
                frames.code_payload(
                    ErrorCode.GOING_AWAY, "server is shutting down; retry on a new link"
                ),
            )
            return
        if len(self._streams) >= self.settings.max_streams:
            self._queue(
                FrameType.OPEN_RESULT,
                0,
                stream_id,
                frames.code_payload(
                    ErrorCode.LIMIT, f"stream limit of {self.settings.max_streams} per link reached"
                ),
            )
            return
        self._streams[stream_id] = _Stream(
            stream_id, self.peer_initial_window, self.settings.initial_window, opened=False
        )
        self.streams_opened += 1
        events.append(StreamOpenRequested(stream_id, host, port))

    def _on_open_result(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if self.role is not Role.AGENT:
            raise ProtocolError("OPEN_RESULT sent to the server")
        code, message = frames.parse_code(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, "OPEN_RESULT")
            return
        if stream.opened:
            raise ProtocolError(f"second OPEN_RESULT for stream {stream_id}")
        if code is ErrorCode.OK:
            stream.opened = True
            events.append(StreamOpened(stream_id))
        else:
            del self._streams[stream_id]
            self._discard(stream)
            events.append(StreamOpenFailed(stream_id, code, message))

    # --- helpers ---------------------------------------------------------------------------------

    def _check_known(self, stream_id: int, what: str) -> None:
        """Frames for closed streams are normal (races); for never-opened ids they are not."""
        newest = self._next_stream_id - 1 if self.role is Role.AGENT else self._last_peer_stream
        if stream_id == 0 or stream_id > newest:
            raise ProtocolError(f"{what} for stream {stream_id}, which was never opened")

    def _queue(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        self._control.append(_pack_header(len(payload), frame_type, flags, stream_id) + payload)

    def _resize_windows(self, changes: list[tuple[int, int]]) -> None:
        """Give the peer the extra credit of windows the tuner grew; withhold what it shrank."""
        tuner = self.window_tuner
        assert tuner is not None  # only its answers carry changes
        for stream_id, change in changes:
            stream = self._streams.get(stream_id)
            if stream is None or stream.remote_ended:
                continue  # the tuner has been told (forget); its budget is back
            stream.credit_batch = tuner.credit_batch_of(stream_id)
            if change < 0:
                stream.withheld -= change
                continue
            stream.recv_remaining += change
            self._queue(FrameType.WINDOW, 0, stream_id, frames.window_payload(change))

    def _mark_ready(self, stream: _Stream) -> None:
        if not stream.in_ready:
            stream.in_ready = True
            self._ready.append(stream)

    def _maybe_close(self, stream: _Stream) -> None:
        if stream.end_sent and stream.remote_ended:
            stream.closed = True
            self._streams.pop(stream.id, None)

    def _discard(self, stream: _Stream) -> None:
        stream.closed = True
        if self.window_tuner is not None:
            self.window_tuner.forget(stream.id)
        self._buffered -= stream.pending_bytes
        stream.pending = None
        stream.pending_bytes = 0


def _name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return f"frame type {frame_type}"
