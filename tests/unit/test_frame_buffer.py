"""The buffered frame reader: the same frames as FrameReader however the reads fall, no frame
handed out ever changes afterwards, large payloads are read in place, and limits are enforced."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidity.wire.frame_buffer import (
    LARGE_PAYLOAD,
    READ_BUFFER,
    SPARE_PAYLOAD_BUFFERS,
    BufferedFrameReader,
)
from fluidity.wire.frames import HEADER, FrameReader, FrameType, ProtocolError

Frame = tuple[int, int, int, bytes]

_SIZES = st.one_of(
    st.integers(0, 64),
    st.integers(LARGE_PAYLOAD - 2, LARGE_PAYLOAD + 2),
    st.integers(0, 3 * LARGE_PAYLOAD),
    st.sampled_from([READ_BUFFER - 10, READ_BUFFER, READ_BUFFER + 1]),
)


@st.composite
def frame_streams(draw: st.DrawFn) -> list[Frame]:
    frames = []
    for index, size in enumerate(draw(st.lists(_SIZES, min_size=1, max_size=12))):
        payload = bytes([index % 251]) * size
        frames.append((int(FrameType.DATA), index % 2, index + 1, payload))
    return frames


def encode(frames: list[Frame]) -> bytes:
    return b"".join(HEADER.pack(len(p), t, f, s) + p for t, f, s, p in frames)


def read_all(
    reader: BufferedFrameReader, wire: bytes, reads: list[int]
) -> list[tuple[int, int, int, memoryview]]:
    """Play the transport: each read writes up to the next size into the buffer offered."""
    out = []
    pos = 0
    turn = 0
    while pos < len(wire):
        buffer = reader.get_buffer()
        assert len(buffer) > 0
        want = reads[turn % len(reads)]
        turn += 1
        n = min(len(buffer), want, len(wire) - pos)
        buffer[:n] = wire[pos : pos + n]
        buffer.release()
        pos += n
        out += reader.buffer_updated(n)
    return out


@settings(max_examples=150, deadline=None)
@given(frame_streams(), st.lists(st.integers(1, 2 * READ_BUFFER), min_size=1, max_size=8))
def test_frames_are_those_sent_however_the_reads_fall(
    frames: list[Frame], reads: list[int]
) -> None:
    wire = encode(frames)
    reader = BufferedFrameReader()
    got = read_all(reader, wire, reads)
    # Compared only at the end: every frame was held while later reads went on, so a buffer
    # written where a view still pointed would show here.
    assert [(t, f, s, bytes(p)) for t, f, s, p in got] == frames
    assert all(p.readonly for *_, p in got)
    assert reader.buffered == 0
    reference = FrameReader()
    assert [(t, f, s, bytes(p)) for t, f, s, p in reference.feed(wire)] == frames


def test_a_bulk_stream_is_read_in_place_after_the_first_large_frame() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    wire = encode([(int(FrameType.DATA), 0, 1, payload)] * 4)
    reader = BufferedFrameReader()
    offered = []
    got = []
    pos = 0
    while pos < len(wire):
        buffer = reader.get_buffer()
        offered.append(len(buffer))
        n = min(len(buffer), 100_000, len(wire) - pos)
        buffer[:n] = wire[pos : pos + n]
        buffer.release()
        pos += n
        got += reader.buffer_updated(n)
    assert [bytes(p) for *_, p in got] == [payload] * 4
    # After the first frame, each header is read alone (10 bytes) and its payload in place.
    assert offered.count(HEADER.size) == 3


def test_a_small_frame_after_a_large_one_goes_back_to_the_shared_buffer() -> None:
    large = b"L" * LARGE_PAYLOAD
    wire = encode([(3, 0, 1, large), (4, 0, 0, b"\0\0\0\1"), (3, 0, 1, b"small")])
    reader = BufferedFrameReader()
    got = read_all(reader, wire, [len(wire)])
    assert [bytes(p) for *_, p in got] == [large, b"\0\0\0\1", b"small"]
    assert len(reader.get_buffer()) > HEADER.size  # no longer reading headers alone


def test_the_shared_buffer_is_reused_once_no_frame_points_into_it() -> None:
    small = encode([(3, 0, 1, b"x" * 1000)])
    wrap = READ_BUFFER // len(small) + 1  # frames enough to fill the buffer once

    def buffers_used(reader: BufferedFrameReader, hold: list[object] | None) -> set[int]:
        used = set()
        for _ in range(2 * wrap):
            buffer = reader.get_buffer()
            used.add(id(buffer.obj))
            buffer[: len(small)] = small
            buffer.release()
            (frame,) = reader.buffer_updated(len(small))
            assert bytes(frame[3]) == b"x" * 1000
            if hold is not None:
                hold.append(frame)
            del frame
        return used

    held: list[object] = []
    assert len(buffers_used(BufferedFrameReader(), held)) == 3  # frames held: new buffers
    assert len(buffers_used(BufferedFrameReader(), None)) == 1  # none held: the same memory


def test_large_payload_buffers_are_reused_only_once_no_frame_points_into_them() -> None:
    size = 4 * LARGE_PAYLOAD
    reader = BufferedFrameReader()

    def read_frames(count: int, held: list[memoryview] | None) -> set[int]:
        """Read ``count`` large frames (payloads in place); keep them in ``held`` if given.
        Returns the buffers the payloads were read into."""
        used = set()
        for index in range(count):
            payload = bytes([index]) * size
            ((*_, view),) = read_all(reader, encode([(3, 0, 1, payload)]), [HEADER.size, size])
            assert bytes(view) == payload
            used.add(id(view.obj))
            if held is not None:
                held.append(view)
            del view
        return used

    # Each frame dropped at once: one buffer serves them all.
    assert len(read_frames(20, None)) == 1
    # Each frame held: none is written again while held, so each is a buffer of its own.
    held: list[memoryview] = []
    used = read_frames(SPARE_PAYLOAD_BUFFERS + 2, held)
    assert len(used) == SPARE_PAYLOAD_BUFFERS + 2
    assert [bytes(view) for view in held] == [bytes([i]) * size for i in range(len(held))]
    # Released: the newest spares (at most SPARE_PAYLOAD_BUFFERS are kept) serve again.
    held.clear()
    assert read_frames(10, None) < used


def test_an_oversized_frame_is_a_protocol_error_before_its_payload_arrives() -> None:
    reader = BufferedFrameReader(max_payload=1024)
    buffer = reader.get_buffer()
    buffer[: HEADER.size] = HEADER.pack(1025, 3, 0, 1)
    with pytest.raises(ProtocolError, match="1025 bytes exceeds the limit of 1024"):
        reader.buffer_updated(HEADER.size)


def test_buffered_counts_a_partial_header_and_a_partial_large_payload() -> None:
    reader = BufferedFrameReader()
    wire = encode([(3, 0, 1, b"y" * (2 * LARGE_PAYLOAD))])
    buffer = reader.get_buffer()
    buffer[:4] = wire[:4]
    assert reader.buffer_updated(4) == []
    assert reader.buffered == 4
    buffer = reader.get_buffer()
    buffer[:1000] = wire[4:1004]
    assert reader.buffer_updated(1000) == []
    assert reader.buffered == 1004 - HEADER.size
