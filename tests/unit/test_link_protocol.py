"""When a link writes: once per event-loop turn, every FLUSH_BURST DATA writes, never while the
transport is paused (fluidity.link_protocol). A recording transport, no sockets."""

from __future__ import annotations

import asyncio

from fluidity.link_protocol import LinkProtocol
from fluidity.wire import FLUSH_BURST, Role, Session
from fluidity.wire.frames import HEADER, FrameReader, FrameType, hello_payload


class RecordingTransport:
    """Takes the writes of one turn at a time; ``closing`` as the test sets it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def writelines(self, buffers: list[bytes | memoryview]) -> None:
        self.writes.append(b"".join(buffers))

    def is_closing(self) -> bool:
        return self.closing


class Link(LinkProtocol):
    def __init__(self) -> None:
        super().__init__(Session(Role.AGENT))
        self.drained: list[int] = []
        self.recorder = RecordingTransport()
        self.transport = self.recorder  # type: ignore[assignment]
        hello = hello_payload(1, 1 << 20, 256 * 1024)
        self.session.receive_data(HEADER.pack(len(hello), FrameType.HELLO, 0, 0) + hello)
        self.flush()  # our HELLO
        self.recorder.writes.clear()

    def stream_drained(self, stream_id: int) -> None:
        self.drained.append(stream_id)

    def send(self, stream_id: int, data: bytes) -> None:
        """What a stream's writer does: queue DATA, then tell the link."""
        self.session.send_data(stream_id, data)
        self.data_queued()


def data_payloads(written: bytes) -> list[bytes]:
    return [bytes(p) for t, _, _, p in FrameReader().feed(written) if t == FrameType.DATA]


async def next_turn() -> None:
    await asyncio.sleep(0)


async def test_frames_queued_in_one_turn_go_out_in_one_write_at_its_end() -> None:
    link = Link()
    streams = [link.session.open_stream("example.com", 443) for _ in range(3)]
    link.request_flush()
    for index, stream_id in enumerate(streams):
        link.send(stream_id, b"x" * (index + 1))
        link.request_flush()
    assert link.recorder.writes == []  # nothing before the turn ends
    await next_turn()
    (written,) = link.recorder.writes
    assert data_payloads(written) == [b"x", b"xx", b"xxx"]
    assert sorted(link.drained) == streams


async def test_a_burst_of_data_is_written_every_flush_burst_writes() -> None:
    link = Link()
    stream_id = link.session.open_stream("example.com", 443)
    for _ in range(2 * FLUSH_BURST + 3):
        link.send(stream_id, b"y")
    # Two bursts went out while the turn was still running; the last 3 wait for its end.
    assert len(link.recorder.writes) == 2
    assert len(data_payloads(b"".join(link.recorder.writes))) == 2 * FLUSH_BURST
    await next_turn()
    assert len(link.recorder.writes) == 3
    assert len(data_payloads(link.recorder.writes[-1])) == 3


async def test_nothing_is_written_while_paused_and_everything_once_resumed() -> None:
    link = Link()
    stream_id = link.session.open_stream("example.com", 443)
    link.pause_writing()
    for _ in range(FLUSH_BURST + 1):
        link.send(stream_id, b"z")
    await next_turn()
    assert link.recorder.writes == [] and link.drained == []
    link.resume_writing()
    assert len(data_payloads(b"".join(link.recorder.writes))) == FLUSH_BURST + 1
    assert link.drained == [stream_id]  # its writer may go on


async def test_a_closing_transport_gets_nothing() -> None:
    link = Link()
    stream_id = link.session.open_stream("example.com", 443)
    link.recorder.closing = True
    link.send(stream_id, b"late")
    await next_turn()
    assert link.recorder.writes == []
    assert link.session.has_data_to_send()  # kept, not dropped: the link is going away anyway
