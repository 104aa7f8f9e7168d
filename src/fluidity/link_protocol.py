"""What both ends of a link share: the asyncio protocol that moves a session's frames.

The agent's :class:`~fluidity.agent.link.AgentLink` and the server's
:class:`~fluidity.server.link.ServerLink` are each an :class:`asyncio.BufferedProtocol` around a
sans-I/O :class:`~fluidity.wire.Session`. This base holds what they do alike:

- reading: TLS records are decrypted straight into the session's frame buffers
  (:meth:`~fluidity.wire.Session.read_buffer`; no join, no reassembly copy);
- writing: frames queued during one event-loop turn go out together at its end
  (:meth:`request_flush`), so small frames share TLS records and writes; DATA is also written
  after every :data:`~fluidity.wire.FLUSH_BURST` DATA writes (:meth:`data_queued`), so a burst read
  in one turn does not cross the link as one convoy;
- backpressure: nothing is written while the transport is paused; once it resumes, the rest goes
  and each stream whose queue emptied is told (:meth:`stream_drained`).

It imports asyncio and :mod:`fluidity.wire` only; each end adds its own events, streams and timers.
"""

from __future__ import annotations

import asyncio

from fluidity.wire import FLUSH_BURST, Session


class LinkProtocol(asyncio.BufferedProtocol):
    """The frame-moving half of a link protocol (see the module docstring)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._flush_scheduled = False
        self._unflushed = 0  # data_queued calls since the last write

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.read_buffer()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.flush()

    def request_flush(self) -> None:
        """Send what the session has at the end of this event-loop turn (coalesces frames)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def data_queued(self) -> None:
        """A stream queued DATA: send it at the end of the turn, or now if it is the
        :data:`~fluidity.wire.FLUSH_BURST`-th DATA queued since the last write."""
        self._unflushed += 1
        if self._unflushed >= FLUSH_BURST:
            self.flush()
        else:
            self.request_flush()

    def flush(self) -> None:
        """Write what the session has now (all of it, unless the transport pauses us)."""
        self._flush_scheduled = False
        self._unflushed = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        session = self.session
        while not self._paused and session.has_data_to_send():
            transport.writelines(session.buffers_to_send())
        for stream_id in session.take_drained():
            self.stream_drained(stream_id)

    def stream_drained(self, stream_id: int) -> None:
        """Everything queued for ``stream_id`` has been written: its source may go on."""
