"""Dial a stream's target: validate, apply the egress policy, resolve, connect (asyncio).

:func:`dial` turns "open TCP to host:port" into a connected socket or a :class:`DialError` whose
``failure`` maps onto the wire protocol's result codes and whose ``message`` is one line for the
person at the agent. The order is fixed so that DNS cannot get around the policy:

1. validate the target and apply :meth:`EgressPolicy.check_host` (port and name rules);
2. resolve (a literal IP is used as is), then check *every* address with
   :meth:`EgressPolicy.check_address`; denied addresses are never dialed;
3. connect to the allowed addresses in resolver order, one at a time, on the address that was
   checked (no second lookup, so a rebinding DNS answer cannot slip in between).

What "connect" makes is the connector's choice: :func:`connect_tcp` returns a socket; the server
passes one that makes the event loop's transport in the same call (``create_connection`` with the
checked address), which costs half as much CPU per stream as a socket wrapped afterwards.

Limits: ``timeout`` (seconds) bounds the whole call, DNS included. With several allowed addresses,
each attempt gets an equal share of the time left, but at least :data:`MIN_ATTEMPT_TIMEOUT` seconds
(or all that is left), so one silent address cannot use up the time of the others. The system
resolver runs ``getaddrinfo`` in the loop's default thread pool; a lookup that times out keeps its
thread until the C library gives up, so a flood of slow lookups can queue behind each other.
Relative names are resolved as the system resolver does (search domains may apply); whatever
addresses come back are checked.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from fluidity.server.egress import EgressPolicy, IPAddress, normalize_host, parse_ip_literal

__all__ = [
    "MIN_ATTEMPT_TIMEOUT",
    "Connector",
    "DialError",
    "DialFailure",
    "Resolver",
    "connect_tcp",
    "dial",
    "system_resolver",
]

MIN_ATTEMPT_TIMEOUT = 2.0
"""Seconds: the least time one connection attempt gets when several addresses are to be tried."""

Resolver = Callable[[str, int], Awaitable[Iterable[str]]]
"""``async (host, port) -> addresses as text``; raises :class:`socket.gaierror` for a bad name."""

_Connected = TypeVar("_Connected")

Connector = Callable[[IPAddress, int], Awaitable[Any]]
"""``async (address, port) -> connection`` (a connected non-blocking socket, or a transport
made on it); raises OSError on failure and closes what it opened when cancelled."""

_UNREACHABLE_ERRNOS = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,  # e.g. no source address of that family
        errno.EAFNOSUPPORT,  # e.g. IPv6 disabled on this host
    }
)


class DialFailure(enum.Enum):
    """Why a dial failed; the values match the wire protocol's result names."""

    DNS = "dns"  # the name did not resolve
    REFUSED = "refused"  # the target refused the connection
    TIMEOUT = "timeout"  # no answer (DNS or connect) within the timeout
    DENIED = "denied"  # the egress policy forbids the target
    UNREACHABLE = "unreachable"  # no route to the network or host
    ERROR = "error"  # an invalid target or any other failure


# When every address fails, report the most telling failure: one that reached the target first.
_RANK = (DialFailure.REFUSED, DialFailure.TIMEOUT, DialFailure.ERROR, DialFailure.UNREACHABLE)


class DialError(Exception):
    """A dial failed; ``failure`` says why, ``message`` is a one-line explanation."""

    def __init__(self, failure: DialFailure, message: str) -> None:
        super().__init__(f"{failure.value}: {message}")
        self.failure = failure
        self.message = message


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver (``getaddrinfo``), in its preferred order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET6 and len(sockaddr) == 4 and sockaddr[3]:
            addresses.append(f"{str(sockaddr[0]).partition('%')[0]}%{sockaddr[3]}")  # scope id
        elif family in (socket.AF_INET, socket.AF_INET6):
            addresses.append(str(sockaddr[0]))
    return addresses


async def connect_tcp(address: IPAddress, port: int) -> socket.socket:
    """Open a non-blocking TCP socket with TCP_NODELAY to ``address:port``; closed on failure."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@overload
async def dial(
    host: str,
    port: int,
    *,
    policy: EgressPolicy,
    timeout: float,
    resolver: Resolver | None = None,
    connector: None = None,
) -> socket.socket: ...


@overload
async def dial(
    host: str,
    port: int,
    *,
    policy: EgressPolicy,
    timeout: float,
    resolver: Resolver | None = None,
    connector: Callable[[IPAddress, int], Awaitable[_Connected]],
) -> _Connected: ...


async def dial(
    host: str,
    port: int,
    *,
    policy: EgressPolicy,
    timeout: float,
    resolver: Resolver | None = None,
    connector: Connector | None = None,
) -> Any:
    """Connect to ``host:port`` if ``policy`` allows it, within ``timeout`` seconds (> 0).

    ``host`` is a name (at most 253 characters) or an IP literal (IPv6 may be bracketed); ``port``
    is 1-65535. Returns what ``connector`` made of the first address that connected; the default,
    :func:`connect_tcp`, makes a connected, non-blocking TCP socket with TCP_NODELAY set, owned by
    the caller. ``resolver`` defaults to :func:`system_resolver`; tests inject their own. Raises
    :class:`DialError`; cancellation closes any connection being made.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    try:
        literal = parse_ip_literal(host)
        name = "" if literal is not None else normalize_host(host)
        denied = policy.check_host(host, port)
    except ValueError as exc:
        raise DialError(
            DialFailure.ERROR, f"invalid target {host[:80]!r}:{port!r}: {exc}"
        ) from None
    if denied is not None:
        message = f"target {_target(literal, name, port)} is denied by the egress policy"
        raise DialError(DialFailure.DENIED, f"{message} ({denied.reason})")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if literal is not None:
        addresses = [literal]
    else:
        query = name + "." if host.endswith(".") else name
        addresses = await _resolve(resolver or system_resolver, query, port, deadline, timeout)

    allowed = []
    first_denied = None
    for address in addresses:
        decision = policy.check_address(address, port)
        if decision.allowed:
            allowed.append(address)
        elif first_denied is None:
            first_denied = (address, decision)
    if not allowed:
        assert first_denied is not None  # addresses is never empty
        address, decision = first_denied
        target = _target(literal, name, port)
        if literal is not None:
            message = f"target {target} is denied by the egress policy ({decision.reason})"
        else:
            message = (
                f"target {target} resolves to {address}, which the egress policy denies"
                f" ({decision.reason})"
            )
        raise DialError(DialFailure.DENIED, message)
    connector = connector or connect_tcp
    return await _connect_any(loop, connector, allowed, port, deadline=deadline, timeout=timeout)


async def _resolve(
    resolver: Resolver, name: str, port: int, deadline: float, timeout: float
) -> list[IPAddress]:
    """Resolve ``name`` before ``deadline`` into distinct addresses, in the resolver's order."""
    shown = name.rstrip(".")
    try:
        async with asyncio.timeout_at(deadline):
            answers = list(await resolver(name, port))
    except TimeoutError:
        message = f"DNS lookup for {shown!r} did not finish within {_seconds(timeout)}"
        raise DialError(DialFailure.TIMEOUT, message) from None
    except OSError as exc:  # socket.gaierror, or whatever an injected resolver raises
        message = f"no address for {shown!r} (DNS lookup failed: {exc.strerror or exc})"
        raise DialError(DialFailure.DNS, message) from None
    addresses: list[IPAddress] = []
    for answer in answers:
        address = parse_ip_literal(answer)
        if address is None:
            message = f"the resolver returned {answer!r} for {shown!r}, which is not an address"
            raise DialError(DialFailure.ERROR, message)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        message = f"no address for {shown!r} (DNS lookup returned no addresses)"
        raise DialError(DialFailure.DNS, message)
    return addresses


async def _connect_any(
    loop: asyncio.AbstractEventLoop,
    connector: Connector,
    addresses: list[IPAddress],
    port: int,
    *,
    deadline: float,
    timeout: float,
) -> Any:
    """Try ``addresses`` in order until one connects; raise the most telling failure."""
    # Every text below is made only on a failure: a dial that succeeds formats nothing.
    failures: list[tuple[DialFailure, str]] = []
    for index, address in enumerate(addresses):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        share = remaining / (len(addresses) - index)
        budget = max(share, min(MIN_ATTEMPT_TIMEOUT, remaining))
        try:
            async with asyncio.timeout(budget) as scope:
                return await connector(address, port)
        except TimeoutError as exc:
            where = _format(address, port)
            # One address had the whole dial: say the configured timeout, not the few
            # milliseconds less that were left of it after the DNS lookup.
            spent = timeout if len(addresses) == 1 else budget
            within = _seconds(spent) if scope.expired() else f"({exc.strerror or exc})"
            failures.append((DialFailure.TIMEOUT, f"no answer from {where} within {within}"))
            continue
        except ConnectionRefusedError:
            where = _format(address, port)
            failures.append((DialFailure.REFUSED, f"connection to {where} refused"))
            continue
        except OSError as exc:
            where = _format(address, port)
            reason = exc.strerror or str(exc)
            if exc.errno in _UNREACHABLE_ERRNOS:
                failures.append((DialFailure.UNREACHABLE, f"{where} is unreachable ({reason})"))
            else:
                failures.append((DialFailure.ERROR, f"connection to {where} failed ({reason})"))
            continue
    if not failures:
        message = f"no answer from {_format(addresses[0], port)} within {_seconds(timeout)}"
        raise DialError(DialFailure.TIMEOUT, message)
    failure, message = min(failures, key=lambda item: _RANK.index(item[0]))
    if len(failures) > 1:
        message += f" (tried {len(failures)} of {len(addresses)} addresses; all failed)"
    raise DialError(failure, message)


def _target(literal: IPAddress | None, name: str, port: int) -> str:
    return _format(literal, port) if literal is not None else f"{name}:{port}"


def _format(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _seconds(value: float) -> str:
    return f"{value:.3g}s"
