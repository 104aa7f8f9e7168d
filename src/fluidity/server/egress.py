"""Egress policy: which targets the server may dial for an agent (pure logic, no I/O).

An authenticated agent asks the server to "open TCP to host:port". Without a policy that is a
server-side request forgery hole: the agent could read the task's AWS credentials from the ECS task
metadata endpoint (169.254.170.2) or EC2 IMDS (169.254.169.254), or reach anything inside the VPC.
So by default every non-public range in :data:`DEFAULT_DENY_RANGES` is denied, and the address rules
are applied to every *resolved* address: a name that resolves (or rebinds) to a denied address is
refused. The dialer connects to the address it checked and never resolves twice.

Two checks, in order:

1. :meth:`EgressPolicy.check_host` (before DNS): port rules, then host-name rules.
2. :meth:`EgressPolicy.check_address` (each resolved address, or the literal one): port rules,
   then address rules.

Precedence (denies always win over allows; each allow only widens its own level):

- Ports: ``deny_ports`` -> denied; ``allow_ports`` non-empty and the port not in it -> denied.
- Names: ``deny_hosts`` match -> denied; ``allow_hosts`` non-empty and no match -> denied. With
  ``allow_hosts`` set, a literal-IP target passes only if ``allow_cidrs`` covers it (otherwise
  literal addresses would be a way around the list). Host rules never apply to literal addresses.
- Addresses: ``deny_cidrs`` -> denied; ``allow_cidrs`` -> allowed; a default range (when
  ``default_deny_ranges``) -> denied; anything else -> allowed. An IPv6 address that embeds an IPv4
  one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, SIIT ``::ffff:0:a.b.c.d``, NAT64
  ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) is judged as itself *and* as each embedded IPv4
  address, and is allowed only if every judgement allows it.

``allow_hosts`` is an allowlist of names, never a bypass of the address rules: whoever controls DNS
for an allowed name controls where it points (the metadata endpoint included). To reach an internal
service by name, allow its name *and* its addresses (``allow_cidrs``).

Host patterns: ``example.com`` matches exactly; ``.example.com`` and ``*.example.com`` both match
``example.com`` itself and every name under it. Matching is case-insensitive, ignores one trailing
dot and compares IDNA (ASCII) forms. Ports: ``"443"``, ``443`` or a range ``"8000-8999"``.

Limits: host names are at most 253 characters (labels at most 63; letters, digits, ``-`` and ``_``).
Names whose last label is numeric or hex-like (``127.1``, ``0x7f.1``, ``2130706433``) are rejected:
the C resolver reads them as IPv4 addresses. Each check costs a few microseconds: networks are
compiled to integer masks once, and a check scans them linearly.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Rule = Literal[
    "deny_ports", "allow_ports", "deny_hosts", "allow_hosts",
    "deny_cidrs", "allow_cidrs", "default_ranges", "no_rule",
]  # fmt: skip

MAX_HOST_LENGTH = 253
"""The longest host name accepted, in characters, without the trailing dot (RFC 1035)."""

HOST_CACHE_SIZE = 1024
"""Host strings whose parsed form (:func:`parse_ip_literal`, :func:`normalize_host`) is kept:
a server dials the same few targets over and over, and parsing one costs 2-3 µs (an exception
for every name that is not an address). At most about 300 KB; invalid names are not kept."""

DEFAULT_DENY_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "CGNAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # EC2 IMDS 169.254.169.254, ECS metadata 169.254.170.2
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "private"),  # unique local; EC2 IMDS over IPv6 is fd00:ec2::254
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "local-use NAT64"),
)
"""(CIDR, label) pairs denied unless ``allow_cidrs`` re-allows them; the first match is reported."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check: ``rule`` names the deciding rule, ``reason`` is one line of text."""

    allowed: bool
    rule: Rule
    reason: str


_Net = tuple[int, int, str]  # (network as int, netmask as int, reason text)
_Tables = dict[int, tuple[_Net, ...]]  # IP version -> networks
_Hosts = tuple[tuple[str, bool, str], ...]  # (normalized name, is suffix pattern, entry as given)
_Ports = tuple[tuple[int, int], ...]  # inclusive (low, high) ranges
_NO_RULE = Decision(True, "no_rule", "not in any denied range")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", re.ASCII)
_M32 = 0xFFFFFFFF
_LISTS = ("allow_cidrs", "deny_cidrs", "allow_hosts", "deny_hosts", "allow_ports", "deny_ports")


@functools.lru_cache(maxsize=HOST_CACHE_SIZE)
def parse_ip_literal(host: str) -> IPAddress | None:
    """Return ``host`` as an address if it is an IP literal (IPv6 may be in brackets), else None."""
    if len(host) > 100:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=HOST_CACHE_SIZE)
def normalize_host(host: str) -> str:
    """Return a host name in matching form: ASCII (IDNA), lower case, no trailing dot.

    Raises ValueError, with a message saying what is wrong, for a name that is empty, longer than
    :data:`MAX_HOST_LENGTH`, contains a space, control or other disallowed character, has an empty
    or over-long label, or is a numeric IPv4 spelling (see the module docstring).
    """
    if not host:
        raise ValueError("the host name is empty")
    if len(host) > MAX_HOST_LENGTH + 1:
        raise ValueError(f"the host name is {len(host)} characters; the limit is {MAX_HOST_LENGTH}")
    if any(c <= " " or c == "\x7f" for c in host):
        raise ValueError("the host name contains a space or control character")
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"the host name is not a valid international name ({exc})") from None
    name = name.lower()
    if len(name) > MAX_HOST_LENGTH:
        raise ValueError(f"the host name is {len(name)} characters; the limit is {MAX_HOST_LENGTH}")
    if not _HOST_CHARS.issuperset(name):
        raise ValueError("the host name may contain only letters, digits, '-', '_' and '.'")
    labels = name.split(".")
    if any(not label or len(label) > 63 for label in labels):
        raise ValueError("the host name has an empty label or one longer than 63 characters")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("the host name looks like a numeric address; write IPv4 as a.b.c.d")
    return name


def _embedded_ipv4(value: int) -> list[tuple[int, str]]:
    """IPv4 addresses (as ints) carried inside an IPv6 address, with the kind of embedding."""
    high = value >> 32
    if high == 0xFFFF:
        return [(value & _M32, "IPv4-mapped")]
    if high == 0xFFFF0000:
        return [(value & _M32, "IPv4-translated")]
    if high == 0 and value > 1:
        return [(value & _M32, "IPv4-compatible")]
    if high == 0x0064FF9B << 64:
        return [(value & _M32, "NAT64")]
    if value >> 112 == 0x2002:
        return [((value >> 80) & _M32, "6to4")]
    if value >> 96 == 0x20010000:
        return [((value >> 64) & _M32, "Teredo server"), (~value & _M32, "Teredo client")]
    return []


def _match(nets: tuple[_Net, ...], value: int) -> str | None:
    for net, mask, text in nets:
        if value & mask == net:
            return text
    return None


def _compile(networks: Iterable[tuple[IPNetwork, str]]) -> _Tables:
    tables: dict[int, list[_Net]] = {4: [], 6: []}
    for net, text in networks:
        tables[net.version].append((int(net.network_address), int(net.netmask), text))
    return {version: tuple(nets) for version, nets in tables.items()}


def _parse_cidr(setting: str, entry: object) -> IPNetwork:
    if not isinstance(entry, str):
        raise ValueError(f"{setting} entry {entry!r} is not a string")
    try:
        return ipaddress.ip_network(entry.strip())
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{setting} entry {entry!r} is not an IP address or CIDR") from exc
        raise ValueError(
            f"{setting} entry {entry!r} has host bits set; did you mean {loose}?"
        ) from None


def _parse_port_range(setting: str, entry: object) -> tuple[int, int]:
    ok = isinstance(entry, int | str) and not isinstance(entry, bool)
    match = _PORT_RANGE.fullmatch(str(entry)) if ok else None
    if match is None:
        raise ValueError(f"{setting} entry {entry!r} is not a port or a range like '8000-8999'")
    first = int(match[1])
    last = int(match[2] or first)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{setting} entry {entry!r} is not within 1-65535 with low <= high")
    return first, last


def _parse_host_pattern(setting: str, entry: object) -> tuple[str, bool, str]:
    """Return (normalized name, is_suffix_pattern, entry as given)."""
    if not isinstance(entry, str):
        raise ValueError(f"{setting} entry {entry!r} is not a string")
    text = entry.strip()
    suffix = text.startswith(("*.", "."))
    name = text[2:] if text.startswith("*.") else text[1:] if suffix else text
    if parse_ip_literal(name) is not None:
        raise ValueError(f"{setting} entry {entry!r} is an IP address; use allow_cidrs/deny_cidrs")
    if "*" in name:
        raise ValueError(f"{setting} entry {entry!r}: '*' is allowed only as a leading '*.'")
    try:
        return normalize_host(name), suffix, text
    except ValueError as exc:
        raise ValueError(f"{setting} entry {entry!r} is not a valid host pattern: {exc}") from None


def _match_host(patterns: _Hosts, name: str) -> str | None:
    for pattern, suffix, original in patterns:
        if name == pattern or (suffix and name.endswith("." + pattern)):
            return original
    return None


def _compile_cidrs(setting: str, entries: Iterable[object]) -> _Tables:
    nets = [_parse_cidr(setting, entry) for entry in entries]
    return _compile((net, f"{setting} entry {net}") for net in nets)


@dataclass(frozen=True, slots=True)
class _Compiled:
    allow_nets: _Tables
    deny_nets: _Tables
    default_nets: _Tables
    allow_hosts: _Hosts
    deny_hosts: _Hosts
    allow_ports: _Ports
    deny_ports: _Ports


def _sequence(setting: str, value: object) -> tuple[object, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{setting} must be a list, not {type(value).__name__} {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class EgressPolicy:
    """An immutable, validated egress policy; the defaults deny every range in the module docs.

    Build it from plain lists (configuration values); a bad entry raises ValueError naming the
    setting and the entry. See the module docstring for matching and precedence.
    """

    allow_cidrs: Sequence[str] = ()
    deny_cidrs: Sequence[str] = ()
    allow_hosts: Sequence[str] = ()
    deny_hosts: Sequence[str] = ()
    allow_ports: Sequence[str | int] = ()
    deny_ports: Sequence[str | int] = ()
    default_deny_ranges: bool = True
    _c: _Compiled = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lists = {name: _sequence(name, getattr(self, name)) for name in _LISTS}
        for name, value in lists.items():
            object.__setattr__(self, name, value)  # lists become tuples: hashable, immutable
        defaults = DEFAULT_DENY_RANGES if self.default_deny_ranges else ()
        compiled = _Compiled(
            allow_nets=_compile_cidrs("allow_cidrs", lists["allow_cidrs"]),
            deny_nets=_compile_cidrs("deny_cidrs", lists["deny_cidrs"]),
            default_nets=_compile(
                (ipaddress.ip_network(c), f"{lbl} range {c}") for c, lbl in defaults
            ),
            allow_hosts=tuple(_parse_host_pattern("allow_hosts", e) for e in lists["allow_hosts"]),
            deny_hosts=tuple(_parse_host_pattern("deny_hosts", e) for e in lists["deny_hosts"]),
            allow_ports=tuple(_parse_port_range("allow_ports", e) for e in lists["allow_ports"]),
            deny_ports=tuple(_parse_port_range("deny_ports", e) for e in lists["deny_ports"]),
        )
        object.__setattr__(self, "_c", compiled)

    @classmethod
    def from_lists(
        cls,
        *,
        allow_cidrs: Iterable[str] | None = None,
        deny_cidrs: Iterable[str] | None = None,
        allow_hosts: Iterable[str] | None = None,
        deny_hosts: Iterable[str] | None = None,
        allow_ports: Iterable[str | int] | None = None,
        deny_ports: Iterable[str | int] | None = None,
        default_deny_ranges: bool = True,
    ) -> EgressPolicy:
        """Build a policy from config-like values; None means an empty list."""
        return cls(
            allow_cidrs=tuple(allow_cidrs or ()),
            deny_cidrs=tuple(deny_cidrs or ()),
            allow_hosts=tuple(allow_hosts or ()),
            deny_hosts=tuple(deny_hosts or ()),
            allow_ports=tuple(allow_ports or ()),
            deny_ports=tuple(deny_ports or ()),
            default_deny_ranges=default_deny_ranges,
        )

    def check_host(self, host: str, port: int) -> Decision | None:
        """Apply the port and host-name rules before resolution.

        Returns a denying Decision, or None if the target may proceed; its resolved (or literal)
        addresses must then pass :meth:`check_address`. Raises ValueError for a malformed host
        (see :func:`normalize_host`) or a port outside 1-65535.
        """
        denied = self._check_port(port)
        if denied is not None:
            return denied
        literal = parse_ip_literal(host)
        if literal is not None:
            if self._c.allow_hosts and not self._allowed_by_cidr(literal):
                reason = f"allow_hosts is set and {literal} is an address not in allow_cidrs"
                return Decision(False, "allow_hosts", reason)
            return None
        name = normalize_host(host)
        pattern = _match_host(self._c.deny_hosts, name)
        if pattern is not None:
            return Decision(False, "deny_hosts", f"{name} matches deny_hosts entry {pattern!r}")
        if self._c.allow_hosts and _match_host(self._c.allow_hosts, name) is None:
            return Decision(False, "allow_hosts", f"{name} is not in allow_hosts")
        return None

    def check_address(self, ip: IPAddress | str, port: int) -> Decision:
        """Apply the port and address rules to one address (resolved, or a literal target).

        Host-name rules are not applied here. Raises ValueError if ``ip`` is not an IP address or
        the port is outside 1-65535.
        """
        denied = self._check_port(port)
        if denied is not None:
            return denied
        addr = ip if isinstance(ip, IPv4Address | IPv6Address) else ipaddress.ip_address(ip)
        value = int(addr)
        result = self._judge(value, addr.version)
        if not result.allowed or addr.version == 4:
            return result
        for embedded, kind in _embedded_ipv4(value):
            decision = self._judge(embedded, 4)
            if not decision.allowed:
                reason = f"{kind} address embeds {IPv4Address(embedded)}: {decision.reason}"
                return Decision(False, decision.rule, reason)
            if result.rule == "no_rule":
                result = decision  # e.g. allowed because allow_cidrs covers the embedded IPv4
        return result

    def _judge(self, value: int, version: int) -> Decision:
        text = _match(self._c.deny_nets[version], value)
        if text is not None:
            return Decision(False, "deny_cidrs", text)
        text = _match(self._c.allow_nets[version], value)
        if text is not None:
            return Decision(True, "allow_cidrs", text)
        text = _match(self._c.default_nets[version], value)
        if text is not None:
            return Decision(False, "default_ranges", text)
        return _NO_RULE

    def _allowed_by_cidr(self, addr: IPAddress) -> bool:
        value = int(addr)
        if _match(self._c.allow_nets[addr.version], value) is not None:
            return True
        embedded = _embedded_ipv4(value) if addr.version == 6 else []
        return any(_match(self._c.allow_nets[4], v4) is not None for v4, _ in embedded)

    def _check_port(self, port: int) -> Decision | None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port {port!r} is not within 1-65535")
        if any(low <= port <= high for low, high in self._c.deny_ports):
            return Decision(False, "deny_ports", f"port {port} is in deny_ports")
        allow = self._c.allow_ports
        if allow and not any(low <= port <= high for low, high in allow):
            return Decision(False, "allow_ports", f"port {port} is not in allow_ports")
        return None
