"""A :class:`~fluidity.agent.streams.StreamOpener` that dials targets directly over TCP.

Used by the front ends' tests and by diagnostics (``fluidity doctor``): the same front-end code runs
against it and against the tunnel. OS errors are mapped to :class:`OpenFailure` the way the server's
dialer reports them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

from fluidity.agent.streams import OpenFailure, StreamOpenError

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
)


def failure_for_oserror(exc: OSError) -> OpenFailure:
    """Map an OS error from resolving, connecting or reading to an :class:`OpenFailure`."""
    if isinstance(exc, socket.gaierror):
        return OpenFailure.DNS
    if isinstance(exc, ConnectionRefusedError):
        return OpenFailure.REFUSED
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return OpenFailure.TIMEOUT
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return OpenFailure.RESET
    if exc.errno in _UNREACHABLE_ERRNOS:
        return OpenFailure.UNREACHABLE
    return OpenFailure.ERROR


def _open_error(exc: OSError) -> StreamOpenError:
    failure = failure_for_oserror(exc)
    if isinstance(exc, socket.gaierror):
        return StreamOpenError(failure, exc.strerror or str(exc))
    # asyncio's connect errors carry "Connect call failed (addr)" as strerror; the errno's own
    # text is what a person needs.
    message = os.strerror(exc.errno) if exc.errno else (str(exc) or failure.value)
    return StreamOpenError(failure, message)


class DirectStream:
    """A TCP connection behind the :class:`~fluidity.agent.streams.TunnelStream` interface.

    The connection is made in the background; bytes written before it is up (and an early
    ``write_eof``) are queued and sent once it is. Reads return at most ``read_chunk`` bytes; the
    socket's receive buffer in asyncio is bounded by ``read_chunk`` too (reading pauses above
    twice that), and ``drain`` waits while more than ``write_buffer`` bytes are queued.
    """

    def __init__(
        self, host: str, port: int, *, connect_timeout: float, read_chunk: int, write_buffer: int
    ) -> None:
        self._host = host
        self._port = port
        self._read_chunk = read_chunk
        self._write_buffer = write_buffer
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: list[bytes] = []
        self._eof_pending = False
        self._closed = False
        self._task = asyncio.ensure_future(self._connect(connect_timeout))
        # The result is read by wait_open(); a stream closed before anyone asks must not log
        # "exception was never retrieved".
        self._task.add_done_callback(_consume_exception)

    async def _connect(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
                errors: list[OSError] = []
                for family, _, _, _, address in infos:
                    try:
                        reader, writer = await asyncio.open_connection(
                            str(address[0]), self._port, family=family, limit=self._read_chunk
                        )
                    except OSError as exc:
                        errors.append(exc)
                        continue
                    break
                else:
                    raise errors[0] if errors else OSError(errno.EHOSTUNREACH, "no address")
        except TimeoutError:
            raise StreamOpenError(
                OpenFailure.TIMEOUT, f"no connection within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise _open_error(exc) from None
        writer.transport.set_write_buffer_limits(high=self._write_buffer)
        if self._closed:
            writer.close()
            raise StreamOpenError(OpenFailure.ERROR, "stream closed while connecting")
        self._reader, self._writer = reader, writer
        if self._pending:
            writer.writelines(self._pending)
            self._pending.clear()
        if self._eof_pending:
            writer.write_eof()

    async def wait_open(self) -> None:
        """Wait for the TCP connection; raise :class:`StreamOpenError` if it failed."""
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._task.cancelled() and (task is None or not task.cancelling()):
                # close() abandoned the connect; the caller itself was not cancelled.
                raise StreamOpenError(OpenFailure.ERROR, "stream closed while connecting") from None
            raise

    async def read(self) -> bytes:
        """Return up to ``read_chunk`` bytes, or b"" at EOF; errors become StreamOpenError."""
        if self._reader is None:
            await self.wait_open()
        assert self._reader is not None
        try:
            return await self._reader.read(self._read_chunk)
        except OSError as exc:
            raise _open_error(exc) from None

    def write(self, data: bytes) -> None:
        """Send ``data`` (queued until connected); follow with :meth:`drain`."""
        if self._writer is not None:
            self._writer.write(data)
        elif not self._task.done():
            self._pending.append(data)

    async def drain(self) -> None:
        """Wait until at most ``write_buffer`` bytes are queued in the socket."""
        if self._writer is None:
            await self.wait_open()
        assert self._writer is not None
        try:
            await self._writer.drain()
        except OSError as exc:
            raise _open_error(exc) from None

    def write_eof(self) -> None:
        """Shut down the sending direction (queued until connected)."""
        if self._writer is not None:
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()
        else:
            self._eof_pending = True

    def close(self) -> None:
        """Close the connection, or abandon it while connecting. Idempotent."""
        self._closed = True
        if not self._task.done():
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._pending.clear()


def _consume_exception(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class DirectOpener:
    """Opens :class:`DirectStream` objects: plain TCP from this machine, no tunnel.

    ``connect_timeout`` (seconds) bounds name resolution plus connecting; addresses are tried in
    the resolver's order. ``read_chunk`` and ``write_buffer`` (bytes) bound each stream's buffers.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_chunk: int = 256 * 1024,
        write_buffer: int = 256 * 1024,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_chunk = read_chunk
        self.write_buffer = write_buffer

    async def open(self, host: str, port: int) -> DirectStream:
        """Start connecting to ``host:port``; learn the outcome with ``wait_open``."""
        return DirectStream(
            host,
            port,
            connect_timeout=self.connect_timeout,
            read_chunk=self.read_chunk,
            write_buffer=self.write_buffer,
        )
