"""The Fluidity wire protocol, sans-I/O: frames, session state and keepalive.

Imports nothing of the project and no asyncio; see docs/protocol.md for the specification.
"""

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
from fluidity.wire.frames import ALPN, ErrorCode, ProtocolError
from fluidity.wire.keepalive import Keepalive, KeepaliveAction
from fluidity.wire.session import (
    FLUSH_BURST,
    Role,
    Session,
    SessionSettings,
    SessionStateError,
)

__all__ = [
    "ALPN",
    "FLUSH_BURST",
    "DataReceived",
    "ErrorCode",
    "Event",
    "GoAwayReceived",
    "Keepalive",
    "KeepaliveAction",
    "LinkReady",
    "PongReceived",
    "ProtocolError",
    "Role",
    "Session",
    "SessionSettings",
    "SessionStateError",
    "StreamEnded",
    "StreamOpenFailed",
    "StreamOpenRequested",
    "StreamOpened",
    "StreamReset",
]
