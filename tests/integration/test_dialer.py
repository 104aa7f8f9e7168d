"""The server's dialer against real sockets on 127.0.0.1 (never any other real address).

Failures that need another network (unreachable, silent hosts, names that resolve to the metadata
endpoint) are simulated with an injected resolver or connector, so no test sends a packet off
this machine.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator

import pytest

from fluidity.server.dialer import DialError, DialFailure, Resolver, connect_tcp, dial
from fluidity.server.egress import EgressPolicy, IPAddress

LOOPBACK_OK = EgressPolicy(allow_cidrs=["127.0.0.0/8"])
DEFAULT = EgressPolicy()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A real echo server on an ephemeral port of 127.0.0.1."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full, so new connects get no answer."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # fills the queue; the listener never accepts
        yield port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def resolver_returning(*addresses: str) -> tuple[list[str], Resolver]:
    """A resolver that answers every query with ``addresses``, and the list of queries it got."""
    queries: list[str] = []

    async def resolve(host: str, port: int) -> Iterable[str]:
        queries.append(host)
        return list(addresses)

    return queries, resolve


class RecordingConnector:
    """Records every connect attempt; connects for real only to 127.0.0.1, else fails as told."""

    def __init__(self, fail: dict[str, BaseException] | None = None, hang: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}
        self.hang = hang

    async def __call__(self, address: IPAddress, port: int) -> socket.socket:
        self.calls.append(str(address))
        if self.hang:
            await asyncio.Event().wait()  # a target that never answers
        if str(address) in self.fail:
            raise self.fail[str(address)]
        assert str(address) == "127.0.0.1", "tests must never dial a real non-loopback address"
        return await connect_tcp(address, port)


async def expect_failure(failure: DialFailure, dialing: Awaitable[socket.socket]) -> DialError:
    with pytest.raises(DialError) as info:
        await dialing
    assert info.value.failure is failure, info.value.message
    assert "\n" not in info.value.message
    return info.value


async def test_dial_connects_to_an_allowed_loopback_server(echo_port: int) -> None:
    sock = await dial("127.0.0.1", echo_port, policy=LOOPBACK_OK, timeout=5)
    try:
        assert sock.getpeername() == ("127.0.0.1", echo_port)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert not sock.getblocking()
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
    finally:
        sock.close()


async def test_dial_by_name_resolves_with_the_system_resolver(echo_port: int) -> None:
    sock = await dial("localhost", echo_port, policy=LOOPBACK_OK, timeout=5)
    with sock:
        assert sock.getpeername()[1] == echo_port


async def test_default_policy_denies_loopback(echo_port: int) -> None:
    error = await expect_failure(
        DialFailure.DENIED, dial("127.0.0.1", echo_port, policy=DEFAULT, timeout=5)
    )
    assert error.message == (
        f"target 127.0.0.1:{echo_port} is denied by the egress policy (loopback range 127.0.0.0/8)"
    )


async def test_default_policy_denies_a_name_that_resolves_to_loopback(echo_port: int) -> None:
    error = await expect_failure(
        DialFailure.DENIED, dial("localhost", echo_port, policy=DEFAULT, timeout=5)
    )
    assert error.message.startswith(f"target localhost:{echo_port} resolves to 127.0.0.1")


async def test_default_policy_denies_ipv6_loopback_literals() -> None:
    for host in ("::1", "[::1]", "::ffff:127.0.0.1"):
        await expect_failure(DialFailure.DENIED, dial(host, 80, policy=DEFAULT, timeout=5))


async def test_closed_port_is_refused_quickly(closed_port: int) -> None:
    started = time.monotonic()
    error = await expect_failure(
        DialFailure.REFUSED, dial("127.0.0.1", closed_port, policy=LOOPBACK_OK, timeout=5)
    )
    assert time.monotonic() - started < 1
    assert error.message == f"connection to 127.0.0.1:{closed_port} refused"


async def test_unknown_name_from_an_injected_resolver_is_a_dns_failure() -> None:
    async def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    connector = RecordingConnector()
    error = await expect_failure(
        DialFailure.DNS,
        dial("nosuch.test", 443, policy=DEFAULT, timeout=5, resolver=failing, connector=connector),
    )
    assert (
        error.message
        == "no address for 'nosuch.test' (DNS lookup failed: Name or service not known)"
    )
    assert connector.calls == []


async def test_unknown_name_from_the_system_resolver_fails_fast() -> None:
    started = time.monotonic()
    error = await expect_failure(
        DialFailure.DNS, dial("nosuch.invalid", 443, policy=DEFAULT, timeout=5)
    )
    assert time.monotonic() - started < 2
    assert error.message.startswith("no address for 'nosuch.invalid' (DNS lookup failed: ")


async def test_empty_answer_is_a_dns_failure() -> None:
    _, resolve = resolver_returning()
    error = await expect_failure(
        DialFailure.DNS, dial("empty.test", 443, policy=DEFAULT, timeout=5, resolver=resolve)
    )
    assert "returned no addresses" in error.message


async def test_name_resolving_to_the_metadata_endpoint_is_denied_without_connecting() -> None:
    queries, resolve = resolver_returning("169.254.169.254")
    connector = RecordingConnector()
    policy = EgressPolicy(allow_hosts=["innocent.example.com"])
    error = await expect_failure(
        DialFailure.DENIED,
        dial(
            "Innocent.Example.com",
            80,
            policy=policy,
            timeout=5,
            resolver=resolve,
            connector=connector,
        ),
    )
    assert queries == ["innocent.example.com"]
    assert connector.calls == []
    assert error.message == (
        "target innocent.example.com:80 resolves to 169.254.169.254, which the egress policy"
        " denies (link-local range 169.254.0.0/16)"
    )


async def test_mapped_metadata_address_is_denied_without_connecting() -> None:
    _, resolve = resolver_returning("::ffff:169.254.170.2")
    connector = RecordingConnector()
    error = await expect_failure(
        DialFailure.DENIED,
        dial("ecs.test", 80, policy=DEFAULT, timeout=5, resolver=resolve, connector=connector),
    )
    assert "IPv4-mapped address embeds 169.254.170.2" in error.message
    assert connector.calls == []


async def test_only_allowed_addresses_of_a_name_are_dialed(echo_port: int) -> None:
    _, resolve = resolver_returning("169.254.169.254", "10.0.0.5", "127.0.0.1", "127.0.0.1")
    connector = RecordingConnector()
    sock = await dial(
        "mixed.test",
        echo_port,
        policy=LOOPBACK_OK,
        timeout=5,
        resolver=resolve,
        connector=connector,
    )
    sock.close()
    assert connector.calls == ["127.0.0.1"]


async def test_host_and_port_rules_are_applied_before_resolution() -> None:
    queries, resolve = resolver_returning("93.184.216.34")
    policy = EgressPolicy(deny_hosts=["*.blocked.test"], allow_ports=["443"])
    connector = RecordingConnector()
    for host, port, reason in [
        ("www.blocked.test", 443, "www.blocked.test matches deny_hosts entry '*.blocked.test'"),
        ("example.test", 25, "port 25 is not in allow_ports"),
    ]:
        error = await expect_failure(
            DialFailure.DENIED,
            dial(host, port, policy=policy, timeout=5, resolver=resolve, connector=connector),
        )
        assert error.message == f"target {host}:{port} is denied by the egress policy ({reason})"
    assert queries == []
    assert connector.calls == []


async def test_next_address_is_tried_after_a_failure(echo_port: int) -> None:
    _, resolve = resolver_returning("127.0.0.2", "127.0.0.1")
    connector = RecordingConnector(
        fail={"127.0.0.2": ConnectionRefusedError(errno.ECONNREFUSED, "x")}
    )
    sock = await dial(
        "two.test", echo_port, policy=LOOPBACK_OK, timeout=5, resolver=resolve, connector=connector
    )
    sock.close()
    assert connector.calls == ["127.0.0.2", "127.0.0.1"]


async def test_unreachable_network_is_reported_as_unreachable() -> None:
    _, resolve = resolver_returning("2001:db8::1", "198.51.100.1")
    unreachable = OSError(errno.ENETUNREACH, "Network is unreachable")
    no_route = OSError(errno.EHOSTUNREACH, "No route to host")
    connector = RecordingConnector(fail={"2001:db8::1": unreachable, "198.51.100.1": no_route})
    error = await expect_failure(
        DialFailure.UNREACHABLE,
        dial("far.test", 443, policy=DEFAULT, timeout=5, resolver=resolve, connector=connector),
    )
    assert connector.calls == ["2001:db8::1", "198.51.100.1"]
    assert error.message == (
        "[2001:db8::1]:443 is unreachable (Network is unreachable)"
        " (tried 2 of 2 addresses; all failed)"
    )


async def test_refusal_is_reported_over_unreachable_when_addresses_disagree() -> None:
    _, resolve = resolver_returning("2001:db8::1", "198.51.100.1")
    connector = RecordingConnector(
        fail={
            "2001:db8::1": OSError(errno.ENETUNREACH, "Network is unreachable"),
            "198.51.100.1": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        }
    )
    error = await expect_failure(
        DialFailure.REFUSED,
        dial("far.test", 443, policy=DEFAULT, timeout=5, resolver=resolve, connector=connector),
    )
    assert error.message.startswith("connection to 198.51.100.1:443 refused")


async def test_other_connect_errors_are_reported_as_errors() -> None:
    _, resolve = resolver_returning("198.51.100.1")
    connector = RecordingConnector(fail={"198.51.100.1": PermissionError(errno.EACCES, "Denied")})
    error = await expect_failure(
        DialFailure.ERROR,
        dial("x.test", 443, policy=DEFAULT, timeout=5, resolver=resolve, connector=connector),
    )
    assert error.message == "connection to 198.51.100.1:443 failed (Denied)"


async def test_silent_target_times_out_within_the_timeout() -> None:
    _, resolve = resolver_returning("198.51.100.1")
    connector = RecordingConnector(hang=True)
    started = time.monotonic()
    error = await expect_failure(
        DialFailure.TIMEOUT,
        dial("slow.test", 443, policy=DEFAULT, timeout=0.3, resolver=resolve, connector=connector),
    )
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.0
    assert error.message == "no answer from 198.51.100.1:443 within 0.3s"


async def test_slow_dns_counts_against_the_same_timeout() -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return ["198.51.100.1"]

    connector = RecordingConnector()
    started = time.monotonic()
    error = await expect_failure(
        DialFailure.TIMEOUT,
        dial("slow.test", 443, policy=DEFAULT, timeout=0.2, resolver=slow, connector=connector),
    )
    assert time.monotonic() - started < 1.0
    assert error.message == "DNS lookup for 'slow.test' did not finish within 0.2s"
    assert connector.calls == []


@pytest.mark.parametrize(
    ("host", "port", "detail"),
    [
        ("", 443, "empty"),
        ("a b.test", 443, "space or control"),
        ("a\x00b.test", 443, "space or control"),
        ("evil.test\r\nHost: x", 443, "space or control"),
        ("a" * 300, 443, "the limit is 253"),
        ("2130706433", 443, "numeric address"),
        ("example.test", 0, "port 0 is not within 1-65535"),
        ("example.test", 65536, "port 65536 is not within 1-65535"),
    ],
)
async def test_invalid_targets_are_rejected_before_any_lookup(
    host: str, port: int, detail: str
) -> None:
    queries, resolve = resolver_returning("198.51.100.1")
    connector = RecordingConnector()
    error = await expect_failure(
        DialFailure.ERROR,
        dial(host, port, policy=DEFAULT, timeout=5, resolver=resolve, connector=connector),
    )
    assert error.message.startswith("invalid target ")
    assert detail in error.message
    assert queries == []
    assert connector.calls == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count fds")
async def test_real_connect_to_a_silent_port_times_out_and_closes_its_socket(
    silent_port: int,
) -> None:
    before = open_fds()
    started = time.monotonic()
    error = await expect_failure(
        DialFailure.TIMEOUT, dial("127.0.0.1", silent_port, policy=LOOPBACK_OK, timeout=0.3)
    )
    assert 0.25 <= time.monotonic() - started < 1.0
    assert error.message == f"no answer from 127.0.0.1:{silent_port} within 0.3s"
    assert open_fds() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count fds")
async def test_cancelling_a_dial_closes_the_socket_being_connected(silent_port: int) -> None:
    before = open_fds()
    task = asyncio.create_task(dial("127.0.0.1", silent_port, policy=LOOPBACK_OK, timeout=30))
    while open_fds() == before:  # wait until the connecting socket exists
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_fds() == before


async def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await dial("127.0.0.1", 80, policy=LOOPBACK_OK, timeout=0)
