"""What the front ends (HTTP proxy, SOCKS5) need from the tunnel: a byte stream to host:port.

The front ends depend only on these two protocols, so they can be tested against a direct TCP opener
and run in production over the multiplexed link (:mod:`fluidity.agent.tunnel`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol


class OpenFailure(enum.Enum):
    """Why a stream could not be opened (or died), as the front ends need to report it."""

    REFUSED = "refused"  # the target refused the TCP connection
    DNS = "dns"  # the target's name did not resolve
    TIMEOUT = "timeout"  # the dial timed out
    DENIED = "denied"  # the server's egress policy forbids the target
    LIMIT = "limit"  # a stream or connection limit was reached
    UNREACHABLE = "unreachable"  # network or host unreachable
    TUNNEL_DOWN = "tunnel_down"  # no link to the server within the wait time
    LINK_LOST = "link_lost"  # the link died while the stream was open
    RESET = "reset"  # the peer reset the stream
    ERROR = "error"  # anything else


class StreamOpenError(Exception):
    """Opening a stream failed; ``failure`` says why, ``message`` is a one-line explanation."""

    def __init__(self, failure: OpenFailure, message: str) -> None:
        super().__init__(f"{failure.value}: {message}")
        self.failure = failure
        self.message = message


class TunnelStream(Protocol):
    """A bidirectional byte stream to a target, with TCP-like half-close."""

    async def wait_open(self) -> None:
        """Wait for the open result; raise :class:`StreamOpenError` if the open failed.

        Data may be written before this returns (it is sent once the stream opens).
        """

    async def read(self) -> bytes:
        """Return the next chunk of bytes (at most the stream's window), or b"" at end of stream.

        Raises :class:`StreamOpenError` if the open failed or the stream was reset or lost.
        """

    def write(self, data: bytes) -> None:
        """Queue bytes for the target; follow with :meth:`drain` for backpressure."""

    async def drain(self) -> None:
        """Wait until the queued bytes are below the stream's buffer limit."""

    def write_eof(self) -> None:
        """Half-close: no more bytes will be written; reading continues."""

    def close(self) -> None:
        """Close both directions; resets the stream if it is not already finished. Idempotent."""


class StreamConsumer(Protocol):
    """Takes the bytes of a :class:`PushStream` as they arrive (see :meth:`PushStream.push_to`).

    The methods are called from the event loop's callbacks, so they must not block; they may
    call :meth:`PushStream.release` at once or later.
    """

    def stream_open(self) -> None:
        """The target accepted the stream: bytes may flow (called at most once)."""

    def stream_data(self, data: memoryview) -> None:
        """Bytes received on the stream (a read-only view; at most the stream window in all)."""

    def stream_eof(self) -> None:
        """The peer half-closed the stream: no more bytes will come."""

    def stream_error(self, error: StreamOpenError) -> None:
        """The open failed, or the stream was reset or lost; nothing more will come."""


class PushStream:
    """A :class:`TunnelStream` that can hand received bytes to a consumer instead of being read.

    Reading through :meth:`read` needs a task parked in it per stream; pushing to a
    :class:`StreamConsumer` needs none, which saves a task, its coroutine frames and a future per
    idle tunnel (about 1.5 KiB each; thousands of CONNECT tunnels sit idle at once). With
    :attr:`write_blocked` and :meth:`on_writable` in place of :meth:`drain`, a tunnel needs no
    task in either direction (see :mod:`fluidity.agent.connect_tunnel`).

    Flow control is the consumer's: the stream's window is returned only through
    :meth:`release`, so a consumer that holds bytes back (its socket is slow) stops the peer after
    at most one window. Memory per stream stays bounded by the stream window.
    """

    __slots__ = ()

    def push_to(self, consumer: StreamConsumer | None) -> None:
        """Deliver the open result, received bytes, EOF and errors to ``consumer`` from now on
        (``None``: stop).

        An open result, bytes, EOF or an error that arrived before the call are delivered during
        it. While a consumer is set, :meth:`read` must not be used.
        """
        raise NotImplementedError

    def release(self, n: int) -> None:
        """The consumer is done with ``n`` pushed bytes: let the peer send that many more."""
        raise NotImplementedError

    @property
    def write_blocked(self) -> bool:
        """True while more bytes are queued than the stream buffer allows (:meth:`drain` would
        wait): stop writing until the :meth:`on_writable` callback runs."""
        raise NotImplementedError

    def on_writable(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (from the event loop) whenever queued bytes fall back under the
        stream buffer, and when the stream fails; ``None`` removes it."""
        raise NotImplementedError

    # The TunnelStream methods, implemented by subclasses.

    async def wait_open(self) -> None:
        raise NotImplementedError

    async def read(self) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class StreamOpener(Protocol):
    """Opens :class:`TunnelStream` objects."""

    async def open(self, host: str, port: int) -> TunnelStream:
        """Start opening a stream to ``host:port``.

        Returns as soon as the open request is on its way; call :meth:`TunnelStream.wait_open`
        to learn the result. Raises :class:`StreamOpenError` (``TUNNEL_DOWN``) when no link to
        the server becomes available in time.
        """
        ...


class ImmediateOpener(Protocol):
    """A :class:`StreamOpener` that can also open a pushing stream at once, without waiting."""

    def open_now(self, host: str, port: int) -> PushStream | None:
        """Start opening a stream to ``host:port`` if that needs no waiting (a link is up);
        ``None`` otherwise, or if the target is invalid (:meth:`StreamOpener.open` says why)."""
        ...
