"""Frames read straight into buffers the reader owns (for ``asyncio.BufferedProtocol``).

:class:`BufferedFrameReader` yields the same ``(type, flags, stream_id, payload)`` tuples as
:class:`~fluidity.wire.frames.FrameReader`, but the transport writes (or, over TLS, decrypts)
into a buffer the reader hands out, so no ``bytes`` object is made per read, no reads are
joined, and a large payload is not reassembled by copying:

- Small frames land in a shared read buffer (:data:`READ_BUFFER` bytes) and come out as
  read-only views into it. The buffer is never written where a view may point: it is filled
  from the front, and once full it is reused only if no view into it is left, otherwise a new
  one is made.
- A payload of :data:`LARGE_PAYLOAD` bytes or more gets a buffer of its own as soon as its
  header is known; the rest of it is read into that buffer in place. While such frames follow
  each other, the reader asks for the next header alone, so the next payload too is read in
  place (a bulk download moves through the agent without a copy in Python).

Memory: one read buffer, plus up to :data:`SPARE_PAYLOAD_BUFFERS` large-payload buffers kept for
reuse (each reused only once no view into it is left); views handed out keep their buffer alive
until dropped. This module imports nothing of the project but
:mod:`fluidity.wire.frames`, and does no I/O.
"""

from __future__ import annotations

from fluidity.wire.frames import HEADER, HEADER_SIZE, MAX_FRAME_PAYLOAD, frame_too_large

#: Bytes: size of the shared buffer small frames are read into.
READ_BUFFER = 256 * 1024

#: Bytes: payloads this large or larger are read into a buffer of their own, in place.
LARGE_PAYLOAD = 16 * 1024

#: Large-payload buffers kept for reuse once no view into them is left: a fresh 256 KiB buffer
#: per frame costs its zeroing and page faults (about 3 % of the agent's CPU in a bulk download).
SPARE_PAYLOAD_BUFFERS = 4

Frame = tuple[int, int, int, memoryview]


class BufferedFrameReader:
    """Splits the bytes read into :meth:`get_buffer` into frames (see the module docstring)."""

    __slots__ = (
        "_after_large",
        "_buffer",
        "_end",
        "_large",
        "_large_filled",
        "_large_header",
        "_spares",
        "_start",
        "_view",
        "max_payload",
    )

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_payload = max_payload
        # Allocated on the first read: a session that never reads this way costs nothing.
        self._buffer = bytearray()
        self._view = memoryview(self._buffer).toreadonly()
        self._start = 0  # first byte not yet returned in a frame
        self._end = 0  # end of the bytes read
        # The large payload being read in place, its frame header, and how much has arrived.
        self._large: bytearray | None = None
        self._large_header = (0, 0, 0)
        self._large_filled = 0
        self._after_large = False  # the last frame seen was large: read the next header alone
        self._spares = BufferPool(SPARE_PAYLOAD_BUFFERS)  # for large payloads

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return self._end - self._start + (self._large_filled if self._large is not None else 0)

    def get_buffer(self) -> memoryview:
        """Where the next bytes read should go (never empty); then call :meth:`buffer_updated`."""
        large = self._large
        if large is not None:
            return memoryview(large)[self._large_filled :]
        if len(self._buffer) - self._end < HEADER_SIZE + LARGE_PAYLOAD:
            self._renew()
        partial = self._end - self._start
        if self._after_large and partial < HEADER_SIZE:
            return memoryview(self._buffer)[self._end : self._end + HEADER_SIZE - partial]
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into the last :meth:`get_buffer`; return the frames completed.

        Raises :class:`~fluidity.wire.frames.ProtocolError` on a frame longer than ``max_payload``.
        """
        large = self._large
        if large is not None:
            self._large_filled += nbytes
            if self._large_filled < len(large):
                return []
            self._large = None
            frame_type, flags, stream_id = self._large_header
            return [(frame_type, flags, stream_id, memoryview(large).toreadonly())]
        self._end += nbytes
        return self._split()

    def _split(self) -> list[Frame]:
        frames: list[Frame] = []
        view = self._view
        pos = self._start
        end = self._end
        unpack = HEADER.unpack_from
        limit = self.max_payload
        while end - pos >= HEADER_SIZE:
            length, frame_type, flags, stream_id = unpack(view, pos)
            if length > limit:
                raise frame_too_large(length, limit)
            self._after_large = length >= LARGE_PAYLOAD
            stop = pos + HEADER_SIZE + length
            if stop <= end:
                frames.append((frame_type, flags, stream_id, view[pos + HEADER_SIZE : stop]))
                pos = stop
            elif self._after_large:
                # Move what has arrived of this payload to a buffer of its own, where the rest
                # is read in place.
                large = self._large = self._spares.take(length)
                arrived = end - pos - HEADER_SIZE
                large[:arrived] = view[pos + HEADER_SIZE : end]
                self._large_filled = arrived
                self._large_header = (frame_type, flags, stream_id)
                pos = end
            else:
                break
        self._start = pos
        return frames

    def _renew(self) -> None:
        """Make room: start the buffer over, or take a new one if a frame still points into it."""
        partial = bytes(self._view[self._start : self._end])
        buffer = self._buffer
        self._view.release()  # frames handed out are views of their own, still valid
        if not (len(buffer) == READ_BUFFER and _unexported(buffer)):
            buffer = self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(buffer).toreadonly()
        buffer[: len(partial)] = partial
        self._start = 0
        self._end = len(partial)


class BufferPool:
    """Buffers handed out for reading into, each reused once no view into it is left.

    Keeps the ``keep`` most recently handed-out buffers; an older one lives on while a view
    holds it, then is freed. A buffer taken again still holds its old bytes: the reader
    overwrites them. Taking costs a scan of at most ``keep`` buffers.
    """

    __slots__ = ("_buffers", "keep")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._buffers: list[bytearray] = []  # newest last

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes that no view points into: a kept one, or a new one."""
        buffers = self._buffers
        for index, buffer in enumerate(buffers):
            if len(buffer) == size and _unexported(buffer):
                if index != len(buffers) - 1:
                    del buffers[index]
                    buffers.append(buffer)
                return buffer
        # One byte of slack, so the export probe never has to reallocate (and copy) it.
        buffer = bytearray(size + 1)
        del buffer[-1]
        buffers.append(buffer)
        if len(buffers) > self.keep:
            del buffers[0]
        return buffer


def _unexported(buffer: bytearray) -> bool:
    """Whether no view points into ``buffer`` (a frame still held), so it may be overwritten."""
    try:
        # Resizing raises while anything exports the buffer.
        buffer.append(0)
    except BufferError:
        return False
    del buffer[-1]
    return True
