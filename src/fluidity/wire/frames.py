"""Fluidity wire format: frame layout, codes and payload codecs (sans-I/O, no asyncio).

Every frame is a 10-byte header followed by ``length`` bytes of payload::

    +----------------+--------+--------+----------------+
    | length (u32)   | type   | flags  | stream id (u32)|   all big-endian
    +----------------+--------+--------+----------------+
    | payload (length bytes)                             |
    +----------------------------------------------------+

See ``docs/protocol.md`` for the full specification. This module imports nothing of the project.
"""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSION = 1
ALPN = "fluidity/1"

HEADER = struct.Struct("!IBBI")
HEADER_SIZE = HEADER.size  # 10 bytes

#: Largest payload any decoder accepts (bytes); bigger frames are a protocol error.
#: Peers announce a smaller ``max_frame_size`` in HELLO; this is the hard ceiling.
MAX_FRAME_PAYLOAD = 1 << 20
#: Largest flow-control window (bytes) a stream may have; fits HTTP/2's 31-bit rule.
MAX_WINDOW = (1 << 31) - 1
MAX_HOST_LENGTH = 255
MAX_MESSAGE_LENGTH = 512  # bytes of UTF-8 text in OPEN_RESULT, RESET and GOAWAY
MAX_STREAM_ID = (1 << 32) - 1


class FrameType(enum.IntEnum):
    HELLO = 0
    OPEN = 1
    OPEN_RESULT = 2
    DATA = 3
    WINDOW = 4
    RESET = 5
    PING = 6
    GOAWAY = 7
    FRAME_SIZE = 8


# Flags. DATA: END_STREAM half-closes the sender's direction. PING: ACK marks the answer.
FLAG_END_STREAM = 0x01
FLAG_ACK = 0x01


class ErrorCode(enum.IntEnum):
    """Result of an OPEN, reason of a RESET or GOAWAY."""

    OK = 0
    REFUSED = 1  # target refused the TCP connection
    DNS_FAILURE = 2  # target name did not resolve
    TIMEOUT = 3  # dial timed out
    DENIED = 4  # egress policy forbids the target
    LIMIT = 5  # stream limit of the link reached
    UNREACHABLE = 6  # network or host unreachable
    INTERNAL = 7  # unexpected failure on the sender's side
    PROTOCOL_ERROR = 8  # the peer broke this specification
    CANCELLED = 9  # the stream is no longer wanted
    GOING_AWAY = 10  # the sender is shutting down
    FLOW_CONTROL = 11  # the peer sent more than its credit
    CONNECTION_LOST = 12  # the target connection ended abnormally (reset by peer)

    @classmethod
    def parse(cls, value: int) -> ErrorCode:
        """Map an integer from the wire to a code; unknown codes read as INTERNAL."""
        # A table look-up: calling the enum costs about 1 µs, once per stream opened.
        return _ERROR_CODES.get(value, cls.INTERNAL)


_ERROR_CODES = {code.value: code for code in ErrorCode}


class ProtocolError(Exception):
    """The peer sent something this specification does not allow; the link must be closed."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


_HELLO = struct.Struct("!HII")  # version, initial stream window, max frame payload
_OPEN_PORT = struct.Struct("!H")
_CODE = struct.Struct("!B")
_U32 = struct.Struct("!I")  # WINDOW and FRAME_SIZE payloads
_GOAWAY = struct.Struct("!IB")
PING_PAYLOAD_SIZE = 8


def header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode a frame header."""
    return HEADER.pack(length, frame_type, flags, stream_id)


def encode(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode a whole frame (header and payload) as one bytes object."""
    return HEADER.pack(len(payload), frame_type, flags, stream_id) + payload


# --- payload codecs -----------------------------------------------------------------------------


def _text(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_MESSAGE_LENGTH:
        raw = raw[:MAX_MESSAGE_LENGTH].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _decode_text(raw: bytes | memoryview) -> str:
    return bytes(raw[:MAX_MESSAGE_LENGTH]).decode("utf-8", "replace")


def hello_payload(version: int, initial_window: int, max_frame_size: int) -> bytes:
    return _HELLO.pack(version, initial_window, max_frame_size)


def parse_hello(payload: bytes | memoryview) -> tuple[int, int, int]:
    """Return (version, initial_window, max_frame_size); trailing bytes are ignored (extensions)."""
    if len(payload) < _HELLO.size:
        raise ProtocolError(f"HELLO payload is {len(payload)} bytes, expected at least 10")
    version, window, max_frame = _HELLO.unpack_from(payload)
    if not 0 < window <= MAX_WINDOW:
        raise ProtocolError(f"HELLO initial window {window} out of range")
    if not 1024 <= max_frame <= MAX_FRAME_PAYLOAD:
        raise ProtocolError(f"HELLO max frame size {max_frame} out of range")
    return version, window, max_frame


def open_payload(host: str, port: int) -> bytes:
    raw = host.encode("idna") if not host.isascii() else host.encode("ascii")
    if not raw or len(raw) > MAX_HOST_LENGTH:
        raise ValueError(f"host name must be 1-{MAX_HOST_LENGTH} bytes, got {len(raw)}")
    # Refuse here what parse_open refuses, or one bad target would close the whole link.
    if not raw.decode("ascii").isprintable() or b" " in raw:
        raise ValueError(f"host name {host!r} contains spaces or control characters")
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    return _OPEN_PORT.pack(port) + raw


def parse_open(payload: bytes | memoryview) -> tuple[str, int]:
    if len(payload) < 3 or len(payload) > 2 + MAX_HOST_LENGTH:
        raise ProtocolError(f"OPEN payload of {len(payload)} bytes is malformed")
    (port,) = _OPEN_PORT.unpack_from(payload)
    try:
        host = bytes(payload[2:]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("OPEN host is not ASCII") from None
    if port == 0 or not host.isprintable() or " " in host:
        raise ProtocolError("OPEN target is malformed")
    return host, port


def code_payload(code: ErrorCode, message: str = "") -> bytes:
    return _CODE.pack(code) + _text(message)


def parse_code(payload: bytes | memoryview) -> tuple[ErrorCode, str]:
    if len(payload) < 1:
        raise ProtocolError("result frame without a code")
    code = ErrorCode.parse(payload[0])
    return code, _decode_text(payload[1:]) if len(payload) > 1 else ""


def frame_size_payload(size: int) -> bytes:
    return _U32.pack(size)


def parse_frame_size(payload: bytes | memoryview) -> int:
    """The largest DATA payload a FRAME_SIZE frame asks for (bytes, 1 KiB to 1 MiB)."""
    size = _parse_u32(payload, "FRAME_SIZE")
    if not 1024 <= size <= MAX_FRAME_PAYLOAD:
        raise ProtocolError(f"FRAME_SIZE {size} out of range (1 KiB-1 MiB)")
    return size


def window_payload(increment: int) -> bytes:
    return _U32.pack(increment)


def parse_window(payload: bytes | memoryview) -> int:
    increment = _parse_u32(payload, "WINDOW")
    if not 0 < increment <= MAX_WINDOW:
        raise ProtocolError(f"WINDOW increment {increment} out of range", ErrorCode.FLOW_CONTROL)
    return increment


def _parse_u32(payload: bytes | memoryview, frame: str) -> int:
    if len(payload) != _U32.size:
        raise ProtocolError(f"{frame} payload is {len(payload)} bytes, expected 4")
    (value,) = _U32.unpack_from(payload)
    return int(value)


def goaway_payload(last_stream_id: int, code: ErrorCode, message: str = "") -> bytes:
    return _GOAWAY.pack(last_stream_id, code) + _text(message)


def parse_goaway(payload: bytes | memoryview) -> tuple[int, ErrorCode, str]:
    if len(payload) < _GOAWAY.size:
        raise ProtocolError("GOAWAY payload too short")
    last, code = _GOAWAY.unpack_from(payload)
    return last, ErrorCode.parse(code), _decode_text(payload[_GOAWAY.size :])


def frame_too_large(length: int, limit: int) -> ProtocolError:
    """The error for a frame header announcing more than ``limit`` bytes of payload."""
    return ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")


class FrameReader:
    """Splits a byte stream into frames: ``feed(data)`` returns complete frames as tuples.

    Each frame is ``(type, flags, stream_id, payload)``. Payloads of frames that arrived whole in
    one ``feed`` call are zero-copy memoryviews of that call's data; the rest are copied once out
    of the reassembly buffer. Memory held: at most one partial frame (``max_payload`` + 9 bytes).
    """

    __slots__ = ("_buffer", "max_payload")

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, int, memoryview]]:
        """Return the frames completed by ``data``; raise :class:`ProtocolError` on a bad header.

        ``data`` must be immutable (``bytes``): complete frames are returned as views into it.
        """
        frames: list[tuple[int, int, int, memoryview]] = []
        view = memoryview(data)
        buffer = self._buffer
        # Finish a frame left incomplete by the previous call, copying only the bytes it needs.
        while buffer:
            if len(buffer) < HEADER_SIZE:
                take = HEADER_SIZE - len(buffer)
            else:
                take = self._frame_size(buffer) - len(buffer)
                if take == 0:
                    length, frame_type, flags, stream_id = HEADER.unpack_from(buffer)
                    frames.append((frame_type, flags, stream_id, memoryview(buffer[HEADER_SIZE:])))
                    buffer.clear()
                    break
            if not view:
                return frames
            buffer += view[:take]
            view = view[take:]
        end = len(view)
        pos = 0
        unpack = HEADER.unpack_from
        limit = self.max_payload
        while end - pos >= HEADER_SIZE:
            length, frame_type, flags, stream_id = unpack(view, pos)
            if length > limit:
                raise frame_too_large(length, limit)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            frames.append((frame_type, flags, stream_id, view[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            buffer += view[pos:]
            if len(buffer) >= HEADER_SIZE:
                self._frame_size(buffer)  # reject an oversized frame before buffering it
        return frames

    def _frame_size(self, buffer: bytearray) -> int:
        length = HEADER.unpack_from(buffer)[0]
        if length > self.max_payload:
            raise frame_too_large(length, self.max_payload)
        return HEADER_SIZE + int(length)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buffer)
