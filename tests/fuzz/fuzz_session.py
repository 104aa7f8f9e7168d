"""atheris (coverage-guided, libFuzzer) harness for the session state machine.

One :class:`Session` (agent or server role) is driven by the fuzzer's bytes: a hostile peer's
input (raw bytes and plausible frames) interleaved with the local application's own calls (open,
send, end, reset, consume, ping, goaway, flush). Properties checked after every step:

- only :class:`ProtocolError` escapes ``receive_data`` (and :class:`SessionStateError` /
  ``ValueError`` from local misuse that the adapters never make); after a ProtocolError the session
  is failed, has queued a GOAWAY with the error's code, and ignores further input;
- what the session sends always parses as frames;
- memory stays bounded: ``buffered_bytes`` equals the sum of the streams' queues, unconsumed
  received bytes per stream never exceed the window, and the server never holds more streams
  than ``max_streams``.

Run: ``python tests/fuzz/fuzz_session.py [libFuzzer flags] [corpus dirs]``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fluidity.wire import frames
    from fluidity.wire.events import DataReceived, StreamEnded, StreamReset
    from fluidity.wire.frames import FrameReader, FrameType, ProtocolError
    from fluidity.wire.session import Role, Session, SessionSettings, SessionStateError

WINDOW = 1024
MAX_STREAMS = 3
HELLO = frames.encode(FrameType.HELLO, 0, 0, frames.hello_payload(1, WINDOW, 1024))


def _frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A frame with a plausible header (type, flags, small stream id) and fuzzed payload."""
    kind = fdp.ConsumeIntInRange(0, 9)
    flags = fdp.PickValueInList([0, 1, 2, 255])
    stream_id = fdp.ConsumeIntInRange(0, 4)
    choice = fdp.ConsumeIntInRange(0, 6)
    if choice == 6:  # a DATA frame of a chosen size: the way to a peer overrunning its credit
        return frames.encode(FrameType.DATA, 0, stream_id, b"p" * fdp.ConsumeIntInRange(0, 1024))
    if choice == 0:
        payload = frames.window_payload(fdp.ConsumeIntInRange(1, frames.MAX_WINDOW))
    elif choice == 1:
        payload = frames.open_payload("example.com", fdp.ConsumeIntInRange(1, 65535))
    elif choice == 2:
        payload = frames.code_payload(frames.ErrorCode.parse(fdp.ConsumeIntInRange(0, 13)), "x")
    elif choice == 3:
        payload = fdp.ConsumeBytes(8)
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1200))
    return frames.header(kind, flags, stream_id, len(payload)) + payload


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = Role.AGENT if fdp.ConsumeBool() else Role.SERVER
    session = Session(role, SessionSettings(WINDOW, 1024, MAX_STREAMS))
    unconsumed: dict[int, int] = {}
    failed_code = None
    if fdp.ConsumeBool():
        session.receive_data(HELLO)
    for _ in range(64):
        if not fdp.remaining_bytes():
            break
        action = fdp.ConsumeIntInRange(0, 10)
        stream_id = fdp.ConsumeIntInRange(1, 4)
        try:
            if action <= 3:
                incoming = _frame(fdp) if action <= 2 else fdp.ConsumeBytes(50)
                try:
                    events = session.receive_data(incoming)
                except ProtocolError as exc:
                    failed_code = exc.code
                    events = []
                if failed_code is not None and events:
                    raise AssertionError("a failed session produced events")
                for event in events:
                    if type(event) is DataReceived:
                        unconsumed[event.stream_id] = unconsumed.get(event.stream_id, 0) + len(
                            event.data
                        )
                        if unconsumed[event.stream_id] > WINDOW:
                            raise AssertionError(f"stream {event.stream_id} exceeded its window")
                    elif type(event) in (StreamEnded, StreamReset):
                        unconsumed.pop(event.stream_id, None)
            elif action == 4:
                session.open_stream("example.com", 443)
            elif action == 5:
                session.send_data(stream_id, b"d" * fdp.ConsumeIntInRange(0, 3000))
            elif action == 6:
                session.end_stream(stream_id)
            elif action == 7:
                session.reset_stream(stream_id, frames.ErrorCode.CANCELLED)
                unconsumed.pop(stream_id, None)
            elif action == 8:
                n = min(unconsumed.get(stream_id, 0), fdp.ConsumeIntInRange(0, WINDOW))
                session.consumed(stream_id, n)
                if stream_id in unconsumed:
                    unconsumed[stream_id] -= n
            elif action == 9:
                session.send_ping(b"12345678")
            else:
                session.send_goaway()
        except (SessionStateError, ValueError):
            pass  # local misuse, refused as documented
        out = session.data_to_send(fdp.PickValueInList([100, 5000, 1 << 20]))
        sent = FrameReader(frames.MAX_FRAME_PAYLOAD).feed(out)
        goaway = sent and sent[-1][0] == FrameType.GOAWAY
        if (
            failed_code is not None
            and goaway
            and frames.parse_goaway(sent[-1][3])[1] is not failed_code
        ):
            raise AssertionError("GOAWAY does not carry the protocol error's code")
        queued = sum(session.pending_bytes(s) for s in session.stream_ids())
        if queued != session.buffered_bytes:
            raise AssertionError(f"buffered {session.buffered_bytes} != queued {queued}")
        if role is Role.SERVER and session.open_streams > MAX_STREAMS:
            raise AssertionError(f"{session.open_streams} streams open, limit {MAX_STREAMS}")
    if failed_code is not None and (not session.failed or session.receive_data(HELLO) != []):
        raise AssertionError("a failed session kept processing input")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
