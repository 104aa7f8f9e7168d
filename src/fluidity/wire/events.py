"""Events a :class:`~fluidity.wire.session.Session` returns from ``receive_data``.

Small slots classes, treated as immutable. The three the data path makes per frame or per
stream (:class:`DataReceived`, :class:`StreamOpenRequested`, :class:`StreamOpened`) are not
``frozen``: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
which triples its cost, and one is made per DATA frame on both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluidity.wire.frames import ErrorCode


@dataclass(frozen=True, slots=True)
class LinkReady:
    """The peer's HELLO arrived; streams may be opened."""

    version: int
    initial_window: int
    max_frame_size: int


@dataclass(slots=True)
class StreamOpenRequested:
    """(Server) the agent asks for a TCP connection to ``host:port``."""

    stream_id: int
    host: str
    port: int


@dataclass(slots=True)
class StreamOpened:
    """(Agent) the server connected the stream's target."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamOpenFailed:
    """(Agent) the server could not connect the target; the stream is gone."""

    stream_id: int
    code: ErrorCode
    message: str


@dataclass(slots=True)
class DataReceived:
    """Bytes for a stream. ``data`` is a read-only view; call ``Session.consumed`` once used."""

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream: it will send no more bytes."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream; it is gone."""

    stream_id: int
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to one of this side's PINGs, with the payload that was sent."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is shutting down; streams above ``last_stream_id`` were not processed."""

    last_stream_id: int
    code: ErrorCode
    message: str


Event = (
    LinkReady
    | StreamOpenRequested
    | StreamOpened
    | StreamOpenFailed
    | DataReceived
    | StreamEnded
    | StreamReset
    | PongReceived
    | GoAwayReceived
)
