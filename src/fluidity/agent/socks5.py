"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), without I/O.

:class:`Socks5Handshake` is the protocol: feed it the client's bytes, it answers with an event (a
CONNECT request, or a failure) and queues the bytes to send back. The asyncio shell that runs it
for the agent is :class:`fluidity.agent.socks5_frontend.Socks5Frontend`.

Only CONNECT is served. BIND and UDP ASSOCIATE get reply 0x07 (command not supported); an unknown
address type gets 0x08. A handshake is at most 3 small messages (513 + 513 + 262 bytes), so the
buffer needs no limit of its own; bytes a client sends after its request and before the reply are
kept and forwarded once the stream is open.

Reply codes for a failed open (RFC 1928 §6 has no code for every case; choices follow Tor and
OpenSSH): refused → 0x05; unreachable and DNS failure → 0x04 (host unreachable: the tunnel does not
tell a network from a host); timeout → 0x06 ("TTL expired", which Tor uses for timeouts); denied by
the server's egress policy → 0x02 (not allowed by ruleset); tunnel down, stream limit, reset and
anything else → 0x01 (general failure).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from fluidity.agent.streams import OpenFailure

SOCKS_VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929 sub-negotiation version


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    USERNAME_PASSWORD = 0x02
    NONE_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


_KNOWN_COMMANDS = frozenset(int(command) for command in Command)


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


REPLY_FOR_FAILURE: dict[OpenFailure, Reply] = {
    OpenFailure.REFUSED: Reply.CONNECTION_REFUSED,
    OpenFailure.UNREACHABLE: Reply.HOST_UNREACHABLE,
    OpenFailure.DNS: Reply.HOST_UNREACHABLE,
    OpenFailure.TIMEOUT: Reply.TTL_EXPIRED,
    OpenFailure.DENIED: Reply.NOT_ALLOWED,
}
"""How a failed stream open is reported; failures not listed get GENERAL_FAILURE."""


def reply_for(failure: OpenFailure) -> Reply:
    """The SOCKS5 reply code for a failed open."""
    return REPLY_FOR_FAILURE.get(failure, Reply.GENERAL_FAILURE)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asks for a TCP connection to ``host:port`` (IPv6 without brackets)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The handshake cannot go on; any answer is queued in ``data_to_send``, then close.

    ``auth`` is True when the client's credentials were refused (worth logging at info).
    """

    reason: str
    auth: bool = False


Event = ConnectRequest | HandshakeFailed


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    WAIT_REPLY = "wait_reply"
    DONE = "done"
    FAILED = "failed"


class Socks5Handshake:
    """The server side of a SOCKS5 handshake, without I/O.

    ``check_credentials(username, password)`` decides RFC 1929 logins; when it is ``None`` no
    authentication is required (a client that only offers username/password is let in whatever
    it sends). Call :meth:`receive_data` with each chunk until it returns an event, sending
    :meth:`data_to_send` after each call; after a :class:`ConnectRequest`, call :meth:`reply`.
    """

    def __init__(self, check_credentials: Callable[[bytes, bytes], bool] | None = None) -> None:
        self._check = check_credentials
        self._state = _State.GREETING
        self._buffer = bytearray()
        self._out = bytearray()
        self.username: str | None = None  # set after a successful RFC 1929 login

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request (forward them once the stream is open)."""
        return bytes(self._buffer) if self._state in (_State.WAIT_REPLY, _State.DONE) else b""

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> Event | None:
        """Feed bytes; return an event once one is complete, ``None`` while more are needed."""
        if self._state in (_State.DONE, _State.FAILED):
            raise RuntimeError("the SOCKS5 handshake is over")
        self._buffer += data
        while True:
            if self._state is _State.WAIT_REPLY:
                return None
            before = self._state
            event = self._step()
            if event is not None or self._state is before:
                return event

    def reply(self, code: Reply) -> None:
        """Answer the CONNECT request: ``SUCCEEDED`` once the stream is open, else why not."""
        if self._state is not _State.WAIT_REPLY:
            raise RuntimeError("reply() is only valid after a ConnectRequest")
        self._queue_reply(code)
        self._state = _State.DONE if code is Reply.SUCCEEDED else _State.FAILED

    # --- parsing ---------------------------------------------------------------------------------

    def _step(self) -> Event | None:
        if self._state is _State.GREETING:
            return self._greeting()
        if self._state is _State.AUTH:
            return self._auth()
        return self._request()

    def _greeting(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            return self._fail(f"not SOCKS5 (version byte {buf[0]:#04x})")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            self._out += bytes((SOCKS_VERSION, Method.NONE_ACCEPTABLE))
            return self._fail("client offered no authentication method")
        if len(buf) < 2 + count:
            return None
        methods = set(buf[2 : 2 + count])
        del buf[: 2 + count]
        if self._check is not None:
            chosen = Method.USERNAME_PASSWORD if Method.USERNAME_PASSWORD in methods else None
        elif Method.NO_AUTH in methods:
            chosen = Method.NO_AUTH
        else:
            chosen = Method.USERNAME_PASSWORD if Method.USERNAME_PASSWORD in methods else None
        if chosen is None:
            self._out += bytes((SOCKS_VERSION, Method.NONE_ACCEPTABLE))
            wanted = "username/password" if self._check is not None else "no authentication"
            return self._fail(f"client does not offer {wanted}", auth=self._check is not None)
        self._out += bytes((SOCKS_VERSION, chosen))
        self._state = _State.AUTH if chosen is Method.USERNAME_PASSWORD else _State.REQUEST
        return None

    def _auth(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            self._out += bytes((AUTH_VERSION, 0x01))
            return self._fail(f"bad username/password version {buf[0]:#04x} (RFC 1929 needs 1)")
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1:
            return None
        pass_end = user_end + 1 + buf[user_end]
        if len(buf) < pass_end:
            return None
        username, password = bytes(buf[2:user_end]), bytes(buf[user_end + 1 : pass_end])
        del buf[:pass_end]
        if not username:
            self._out += bytes((AUTH_VERSION, 0x01))
            return self._fail("empty user name", auth=True)
        if self._check is not None and not self._check(username, password):
            self._out += bytes((AUTH_VERSION, 0x01))
            return self._fail("wrong user name or password", auth=True)
        self.username = username.decode("utf-8", "replace")
        self._out += bytes((AUTH_VERSION, 0x00))
        self._state = _State.REQUEST
        return None

    def _request(self) -> Event | None:
        buf = self._buffer
        if len(buf) < 4:
            if buf and buf[0] != SOCKS_VERSION:
                return self._refuse(Reply.GENERAL_FAILURE, f"bad request version {buf[0]:#04x}")
            return None
        version, command, _reserved, address_type = buf[0], buf[1], buf[2], buf[3]
        if version != SOCKS_VERSION:
            return self._refuse(Reply.GENERAL_FAILURE, f"bad request version {version:#04x}")
        if command != Command.CONNECT:
            name = Command(command).name if command in _KNOWN_COMMANDS else "unknown"
            return self._refuse(
                Reply.COMMAND_NOT_SUPPORTED, f"command {command:#04x} ({name}) is not supported"
            )
        if address_type == AddressType.IPV4:
            end = 4 + 4
        elif address_type == AddressType.IPV6:
            end = 4 + 16
        elif address_type == AddressType.DOMAIN:
            if len(buf) < 5:
                return None
            end = 5 + buf[4]
        else:
            return self._refuse(
                Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {address_type:#04x} is unknown"
            )
        if len(buf) < end + 2:
            return None
        raw, port = bytes(buf[4:end]), int.from_bytes(buf[end : end + 2], "big")
        del buf[: end + 2]
        if address_type == AddressType.IPV4:
            host = str(ipaddress.IPv4Address(raw))
        elif address_type == AddressType.IPV6:
            host = str(ipaddress.IPv6Address(raw))
        else:
            domain = raw[1:]
            if not domain or not domain.isascii() or not domain.decode().isprintable():
                return self._refuse(
                    Reply.GENERAL_FAILURE, "domain name is empty or not printable ASCII (use IDNA)"
                )
            host = domain.decode()
        if port == 0:
            return self._refuse(Reply.GENERAL_FAILURE, "port 0 is not a valid target")
        self._state = _State.WAIT_REPLY
        return ConnectRequest(host, port)

    # --- answers ---------------------------------------------------------------------------------

    def _queue_reply(self, code: Reply) -> None:
        # BND.ADDR/BND.PORT: the address the server used is on another machine; 0.0.0.0:0 is the
        # customary "not meaningful" answer.
        self._out += bytes((SOCKS_VERSION, code, 0x00, AddressType.IPV4, 0, 0, 0, 0, 0, 0))

    def _refuse(self, code: Reply, reason: str) -> HandshakeFailed:
        self._queue_reply(code)
        return self._fail(reason)

    def _fail(self, reason: str, *, auth: bool = False) -> HandshakeFailed:
        self._state = _State.FAILED
        self._buffer.clear()
        return HandshakeFailed(reason, auth)
