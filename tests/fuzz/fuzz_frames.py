"""atheris (coverage-guided, libFuzzer) harness for the frame decoder and payload codecs.

Property: whatever bytes arrive, in whatever pieces, :class:`FrameReader` and the payload parsers
either decode or raise :class:`ProtocolError`; nothing else escapes, every byte is accounted for,
and the reader never buffers more than one frame. :class:`BufferedFrameReader` (the links' read
path), given the same bytes in reads of other sizes, returns the same frames and fails alike.
Valid payloads re-encode to themselves.

Run: ``python tests/fuzz/fuzz_frames.py [libFuzzer flags] [corpus dirs]``, e.g. ``-runs=100000``
or ``-max_total_time=600``; ``make fuzz-long`` runs it for ten minutes. A crash is written to
``crash-<sha1>`` and reproduces with ``python tests/fuzz/fuzz_frames.py crash-<sha1>``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fluidity.wire import frames
    from fluidity.wire.frame_buffer import BufferedFrameReader
    from fluidity.wire.frames import FrameReader, ProtocolError

PARSERS = (
    frames.parse_hello,
    frames.parse_open,
    frames.parse_code,
    frames.parse_window,
    frames.parse_goaway,
)


def check_reader(fdp: atheris.FuzzedDataProvider) -> None:
    limit = fdp.PickValueInList([1024, 4096, frames.MAX_FRAME_PAYLOAD])
    reader = FrameReader(limit)
    read_size = fdp.ConsumeIntInRange(1, 700)
    fed = consumed = 0
    received = bytearray()
    decoded = []
    try:
        while fdp.remaining_bytes():
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            fed += len(piece)
            received += piece
            for frame_type, flags, stream_id, payload in reader.feed(piece):
                consumed += frames.HEADER_SIZE + len(payload)
                decoded.append((frame_type, flags, stream_id, bytes(payload)))
    except ProtocolError:
        check_buffered_reader(bytes(received), limit, read_size, decoded, failed=True)
        return
    check_buffered_reader(bytes(received), limit, read_size, decoded, failed=False)
    if consumed + reader.buffered != fed:
        raise AssertionError(f"lost bytes: fed {fed}, framed {consumed}, held {reader.buffered}")
    if reader.buffered >= frames.HEADER_SIZE + limit:
        raise AssertionError(f"reader holds {reader.buffered} bytes with a limit of {limit}")


def check_buffered_reader(
    data: bytes, limit: int, read_size: int, expected: list[object], *, failed: bool
) -> None:
    reader = BufferedFrameReader(limit)
    decoded = []
    pos = 0
    try:
        while pos < len(data):
            buffer = reader.get_buffer()
            n = min(len(buffer), read_size, len(data) - pos)
            if n <= 0:
                raise AssertionError("BufferedFrameReader offered an empty buffer")
            buffer[:n] = data[pos : pos + n]
            buffer.release()
            pos += n
            for frame_type, flags, stream_id, payload in reader.buffer_updated(n):
                decoded.append((frame_type, flags, stream_id, bytes(payload)))
    except ProtocolError:
        if not failed:
            raise AssertionError("BufferedFrameReader refused what FrameReader took") from None
        # Frames completed in the same read as the fault are lost with it, and the two readers'
        # reads end in different places: the shorter list must begin the longer.
        shorter = min(len(decoded), len(expected))
        decoded, expected = decoded[:shorter], expected[:shorter]
    else:
        if failed:
            raise AssertionError("BufferedFrameReader took what FrameReader refused")
    if decoded != expected:
        raise AssertionError("BufferedFrameReader and FrameReader decoded different frames")


def check_parsers(fdp: atheris.FuzzedDataProvider) -> None:
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    for parse in PARSERS:
        try:
            result = parse(payload)
        except ProtocolError:
            continue
        if parse is frames.parse_window and frames.window_payload(result) != payload:  # type: ignore[arg-type]
            raise AssertionError("WINDOW does not round-trip")
        if parse is frames.parse_open:
            host, port = result  # type: ignore[misc]
            if frames.open_payload(host, port) != payload:
                raise AssertionError(f"OPEN {host!r}:{port} does not round-trip")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        check_reader(fdp)
    else:
        check_parsers(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
