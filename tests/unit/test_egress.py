"""The server's egress policy: safe by default, configurable, judged on addresses (pure logic)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluidity.server.egress import (
    DEFAULT_DENY_RANGES,
    HOST_CACHE_SIZE,
    Decision,
    EgressPolicy,
    normalize_host,
    parse_ip_literal,
)

DEFAULT = EgressPolicy()

DENIED_BY_DEFAULT = [
    ("127.0.0.1", "loopback range 127.0.0.0/8"),
    ("127.255.255.254", "loopback range 127.0.0.0/8"),
    ("::1", "loopback range ::1/128"),
    ("10.0.0.5", "private range 10.0.0.0/8"),
    ("172.16.0.1", "private range 172.16.0.0/12"),
    ("172.31.255.255", "private range 172.16.0.0/12"),
    ("192.168.1.1", "private range 192.168.0.0/16"),
    ("fd00::1", "private range fc00::/7"),
    ("fd00:ec2::254", "private range fc00::/7"),  # EC2 IMDS over IPv6
    ("fc00::1", "private range fc00::/7"),
    ("169.254.169.254", "link-local range 169.254.0.0/16"),  # EC2 IMDS
    ("169.254.170.2", "link-local range 169.254.0.0/16"),  # ECS task metadata
    ("fe80::1", "link-local range fe80::/10"),
    ("fe80::1%eth0", "link-local range fe80::/10"),
    ("fec0::1", "site-local range fec0::/10"),
    ("100.64.1.1", "CGNAT range 100.64.0.0/10"),
    ("100.127.255.255", "CGNAT range 100.64.0.0/10"),
    ("224.0.0.1", "multicast range 224.0.0.0/4"),
    ("239.255.255.250", "multicast range 224.0.0.0/4"),
    ("ff02::1", "multicast range ff00::/8"),
    ("0.0.0.0", "unspecified range 0.0.0.0/8"),
    ("0.1.2.3", "unspecified range 0.0.0.0/8"),
    ("::", "unspecified range ::/128"),
    ("255.255.255.255", "broadcast range 255.255.255.255/32"),
    ("240.0.0.1", "reserved range 240.0.0.0/4"),
    ("64:ff9b:1::a00:1", "local-use NAT64 range 64:ff9b:1::/48"),
]

EMBEDDED_DENIED = [
    ("::ffff:127.0.0.1", "IPv4-mapped address embeds 127.0.0.1: loopback range 127.0.0.0/8"),
    (
        "::ffff:169.254.169.254",
        "IPv4-mapped address embeds 169.254.169.254: link-local range 169.254.0.0/16",
    ),
    ("::ffff:a9fe:aa02", "IPv4-mapped address embeds 169.254.170.2: link-local range"),
    ("::127.0.0.1", "IPv4-compatible address embeds 127.0.0.1: loopback range"),
    ("::ffff:0:10.0.0.1", "IPv4-translated address embeds 10.0.0.1: private range"),
    ("64:ff9b::169.254.169.254", "NAT64 address embeds 169.254.169.254: link-local range"),
    ("64:ff9b::a00:5", "NAT64 address embeds 10.0.0.5: private range"),
    ("2002:7f00:1::1", "6to4 address embeds 127.0.0.1: loopback range"),
    ("2002:a9fe:a9fe::", "6to4 address embeds 169.254.169.254: link-local range"),
    ("2001:0:a00:1::", "Teredo server address embeds 10.0.0.1: private range"),
]

PUBLIC = ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700::1", "2a00:1450:4001:80b::200e"]


@pytest.mark.parametrize(("address", "reason"), DENIED_BY_DEFAULT)
def test_default_policy_denies_non_public_ranges(address: str, reason: str) -> None:
    assert DEFAULT.check_address(address, 443) == Decision(False, "default_ranges", reason)


@pytest.mark.parametrize(("address", "reason"), EMBEDDED_DENIED)
def test_ipv6_addresses_are_judged_by_their_embedded_ipv4(address: str, reason: str) -> None:
    decision = DEFAULT.check_address(address, 443)
    assert not decision.allowed
    assert decision.rule == "default_ranges"
    assert decision.reason.startswith(reason)


@pytest.mark.parametrize(
    "address",
    [*PUBLIC, "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1", "::8.8.8.8"],
)
def test_default_policy_allows_public_addresses(address: str) -> None:
    assert DEFAULT.check_address(address, 443) == Decision(
        True, "no_rule", "not in any denied range"
    )
    assert DEFAULT.check_host(address, 443) is None


def test_check_address_accepts_address_objects() -> None:
    assert not DEFAULT.check_address(ipaddress.ip_address("169.254.169.254"), 80).allowed
    assert DEFAULT.check_address(ipaddress.ip_address("2606:4700::1"), 80).allowed


def test_allow_cidrs_reallows_loopback_and_its_mapped_form() -> None:
    policy = EgressPolicy(allow_cidrs=["127.0.0.0/8", "::1"])
    for address in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert policy.check_address(address, 8080).allowed, address
    assert policy.check_address("127.0.0.1", 1).rule == "allow_cidrs"
    assert policy.check_address("::ffff:127.0.0.1", 1).reason == "allow_cidrs entry 127.0.0.0/8"
    assert not policy.check_address("169.254.169.254", 80).allowed
    assert not policy.check_address("10.0.0.1", 80).allowed


def test_allow_cidrs_for_an_ipv6_prefix_does_not_allow_the_ipv4_it_embeds() -> None:
    policy = EgressPolicy(allow_cidrs=["2002::/16"])
    decision = policy.check_address("2002:a00:1::1", 443)
    assert not decision.allowed
    assert "6to4 address embeds 10.0.0.1" in decision.reason


def test_deny_cidrs_win_over_allow_cidrs_and_extend_the_defaults() -> None:
    policy = EgressPolicy(allow_cidrs=["10.0.0.0/8"], deny_cidrs=["10.1.0.0/16", "203.0.113.0/24"])
    assert policy.check_address("10.2.3.4", 22).allowed
    assert policy.check_address("10.1.2.3", 22) == Decision(
        False, "deny_cidrs", "deny_cidrs entry 10.1.0.0/16"
    )
    assert policy.check_address("203.0.113.7", 443).rule == "deny_cidrs"
    mapped = policy.check_address("::ffff:203.0.113.7", 443)
    assert (mapped.allowed, mapped.rule) == (False, "deny_cidrs")


def test_default_ranges_can_be_switched_off_but_deny_cidrs_still_apply() -> None:
    policy = EgressPolicy(default_deny_ranges=False, deny_cidrs=["169.254.0.0/16"])
    assert policy.check_address("10.0.0.1", 80).allowed
    assert policy.check_address("127.0.0.1", 80).allowed
    assert not policy.check_address("169.254.169.254", 80).allowed


def test_port_lists_and_ranges() -> None:
    policy = EgressPolicy(allow_ports=["443", 80, "8000-8999"], deny_ports=["8443"])
    for port in (80, 443, 8000, 8500, 8999):
        assert policy.check_host("example.com", port) is None, port
        assert policy.check_address("93.184.216.34", port).allowed, port
    for port in (22, 25, 7999, 9000, 65535):
        assert policy.check_host("example.com", port) == Decision(
            False, "allow_ports", f"port {port} is not in allow_ports"
        )
        assert policy.check_address("93.184.216.34", port).rule == "allow_ports"
    assert policy.check_host("example.com", 8443) == Decision(
        False, "deny_ports", "port 8443 is in deny_ports"
    )


def test_deny_ports_alone_leaves_other_ports_open() -> None:
    policy = EgressPolicy(deny_ports=["25", "1-21"])
    assert policy.check_host("mail.example.com", 25) is not None
    assert policy.check_host("example.com", 21) is not None
    assert policy.check_host("example.com", 22) is None


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_ports_outside_the_tcp_range_are_invalid(port: int) -> None:
    with pytest.raises(ValueError, match="not within 1-65535"):
        DEFAULT.check_host("example.com", port)
    with pytest.raises(ValueError, match="not within 1-65535"):
        DEFAULT.check_address("93.184.216.34", port)


def test_host_patterns_exact_and_suffix() -> None:
    policy = EgressPolicy(allow_hosts=["example.com", "*.github.com", ".internal.test"])
    for host in ("example.com", "EXAMPLE.com.", "github.com", "api.github.com", "a.b.github.com"):
        assert policy.check_host(host, 443) is None, host
    assert policy.check_host("x.internal.test", 443) is None
    for host in ("www.example.com", "notgithub.com", "github.com.evil.test", "example.org"):
        decision = policy.check_host(host, 443)
        assert decision is not None, host
        assert decision.rule == "allow_hosts"
    assert policy.check_host("www.example.com", 443) == Decision(
        False, "allow_hosts", "www.example.com is not in allow_hosts"
    )


def test_deny_hosts_win_over_allow_hosts() -> None:
    policy = EgressPolicy(allow_hosts=["*.example.com"], deny_hosts=["admin.example.com"])
    assert policy.check_host("www.example.com", 443) is None
    assert policy.check_host("Admin.Example.COM.", 443) == Decision(
        False, "deny_hosts", "admin.example.com matches deny_hosts entry 'admin.example.com'"
    )


def test_deny_hosts_suffix_pattern_covers_the_domain_itself() -> None:
    policy = EgressPolicy(deny_hosts=["*.metadata.test"])
    assert policy.check_host("metadata.test", 80) is not None
    assert policy.check_host("x.metadata.test", 80) is not None
    assert policy.check_host("othermetadata.test", 80) is None


def test_an_allowed_name_does_not_bypass_the_address_check() -> None:
    policy = EgressPolicy(allow_hosts=["trusted.example.com"])
    assert policy.check_host("trusted.example.com", 80) is None
    # Whatever DNS says, the resolved address is checked on its own.
    assert not policy.check_address("169.254.169.254", 80).allowed


def test_with_allow_hosts_set_literal_addresses_need_allow_cidrs() -> None:
    policy = EgressPolicy(allow_hosts=["example.com"], allow_cidrs=["198.51.100.0/24"])
    decision = policy.check_host("93.184.216.34", 443)
    assert decision is not None
    assert decision.rule == "allow_hosts"
    assert "93.184.216.34 is an address not in allow_cidrs" in decision.reason
    assert policy.check_host("198.51.100.7", 443) is None
    assert policy.check_host("::ffff:198.51.100.7", 443) is None


def test_host_rules_do_not_apply_to_literal_addresses() -> None:
    policy = EgressPolicy(deny_hosts=["example.com"])
    assert policy.check_host("93.184.216.34", 443) is None
    assert policy.check_host("[2606:4700::1]", 443) is None


def test_international_names_match_in_idna_form() -> None:
    policy = EgressPolicy(deny_hosts=["bücher.example"])
    assert policy.check_host("xn--bcher-kva.example", 443) is not None
    assert policy.check_host("BÜCHER.example", 443) is not None


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("", "empty"),
        ("a" * 254, "the limit is 253"),
        ("exa mple.com", "space or control"),
        ("example.com\x00.evil", "space or control"),
        ("example.com\r\nx", "space or control"),
        ("a..b", "empty label"),
        ("x" * 64 + ".com", "longer than 63"),
        ("ex/ample.com", "only letters, digits"),
        ("user@example.com", "only letters, digits"),
        ("2130706433", "numeric address"),
        ("127.1", "numeric address"),
        ("0x7f.1", "numeric address"),
        ("0x7f000001", "numeric address"),
        ("010.0.0.1", "numeric address"),
    ],
)
def test_malformed_host_names_are_rejected(host: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_host(host)
    with pytest.raises(ValueError, match=message):
        DEFAULT.check_host(host, 443)


def test_host_normalization() -> None:
    assert normalize_host("WWW.Example.COM.") == "www.example.com"
    assert normalize_host("_srv.example.com") == "_srv.example.com"
    assert normalize_host("a" * 63 + ".b") == "a" * 63 + ".b"
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert normalize_host(longest + ".") == longest
    with pytest.raises(ValueError, match="254 characters; the limit is 253"):
        normalize_host(longest + "d")
    assert parse_ip_literal("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip_literal("127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip_literal("127.1") is None
    assert parse_ip_literal("example.com") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allow_cidrs": ["10.0.0.0/33"]}, "allow_cidrs entry '10.0.0.0/33' is not an IP address"),
        ({"deny_cidrs": ["nonsense"]}, "deny_cidrs entry 'nonsense' is not an IP address or CIDR"),
        ({"allow_cidrs": ["10.0.0.1/8"]}, "has host bits set; did you mean 10.0.0.0/8"),
        ({"allow_cidrs": [10]}, "allow_cidrs entry 10 is not a string"),
        ({"allow_cidrs": "127.0.0.0/8"}, "allow_cidrs must be a list, not str"),
        ({"allow_ports": ["0"]}, "allow_ports entry '0' is not within 1-65535"),
        ({"allow_ports": [70000]}, "allow_ports entry 70000 is not within 1-65535"),
        ({"deny_ports": ["9000-8000"]}, "deny_ports entry '9000-8000' is not within 1-65535"),
        ({"deny_ports": ["http"]}, "deny_ports entry 'http' is not a port or a range"),
        ({"deny_ports": ["1-2-3"]}, "is not a port or a range"),
        ({"deny_ports": [True]}, "deny_ports entry True is not a port"),
        ({"allow_hosts": ["foo.*.com"]}, "allow_hosts entry 'foo.\\*.com': '\\*' is allowed only"),
        ({"allow_hosts": ["*"]}, "allow_hosts entry '\\*'"),
        ({"deny_hosts": ["10.0.0.1"]}, "deny_hosts entry '10.0.0.1' is an IP address; use"),
        ({"deny_hosts": ["bad host"]}, "deny_hosts entry 'bad host' is not a valid host pattern"),
        ({"deny_hosts": [""]}, "deny_hosts entry '' is not a valid host pattern"),
    ],
)
def test_invalid_entries_are_rejected_with_the_entry_named(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EgressPolicy(**kwargs)  # type: ignore[arg-type]


def test_from_lists_accepts_config_values_and_none() -> None:
    policy = EgressPolicy.from_lists(
        allow_cidrs=["127.0.0.0/8"], deny_ports=None, allow_ports=[443]
    )
    assert policy == EgressPolicy(allow_cidrs=("127.0.0.0/8",), allow_ports=(443,))
    assert policy.check_address("127.0.0.1", 443).allowed
    assert hash(policy) == hash(EgressPolicy(allow_cidrs=["127.0.0.0/8"], allow_ports=[443]))
    with pytest.raises(ValueError, match="allow_cidrs entry 'x'"):
        EgressPolicy.from_lists(allow_cidrs=["x"])


def test_the_default_range_table_is_valid_and_labelled() -> None:
    for cidr, label in DEFAULT_DENY_RANGES:
        network = ipaddress.ip_network(cidr)
        assert not DEFAULT.check_address(network.network_address, 1).allowed, cidr
        assert label


# Non-global ranges (per the ipaddress module) that the default policy deliberately allows:
# documentation and benchmarking ranges, IETF protocol assignments, the old 6to4 relay anycast.
# Depending on the Python version, ipaddress counts some of them as private.
INTENTIONALLY_ALLOWED = [
    ipaddress.ip_network(n)
    for n in (
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
    )
]

ipv4_addresses = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@given(ipv4_addresses)
def test_ipv4_verdict_matches_the_ipaddress_flags(address: ipaddress.IPv4Address) -> None:
    # ipaddress calls multicast "global"; everything else non-global is denied unless listed above.
    expected = (address.is_global and not address.is_multicast) or any(
        address in net for net in INTENTIONALLY_ALLOWED
    )
    assert DEFAULT.check_address(address, 443).allowed == expected
    if address.is_loopback:
        assert "loopback" in DEFAULT.check_address(address, 443).reason
    if address.is_link_local:
        assert "link-local" in DEFAULT.check_address(address, 443).reason


@given(ipv4_addresses)
def test_ipv6_forms_of_an_ipv4_address_get_the_same_verdict(
    address: ipaddress.IPv4Address,
) -> None:
    expected = DEFAULT.check_address(address, 443).allowed
    value = int(address)
    for form in (0xFFFF << 32 | value, 0x0064FF9B << 96 | value, 0x2002 << 112 | value << 80):
        assert DEFAULT.check_address(ipaddress.IPv6Address(form), 443).allowed == expected


@given(ipv4_addresses)
def test_allow_everything_policy_allows_every_address(address: ipaddress.IPv4Address) -> None:
    policy = EgressPolicy(default_deny_ranges=False)
    assert policy.check_address(address, 1).allowed


def test_parsed_hosts_are_kept_in_bounded_caches_that_never_keep_errors() -> None:
    for parse in (parse_ip_literal, normalize_host):
        parse.cache_clear()
    for i in range(HOST_CACHE_SIZE + 50):
        assert parse_ip_literal(f"host{i}.example") is None
        assert normalize_host(f"HOST{i}.example.") == f"host{i}.example"
    for parse in (parse_ip_literal, normalize_host):
        info = parse.cache_info()
        assert info.maxsize == HOST_CACHE_SIZE and info.currsize == HOST_CACHE_SIZE
    # A cached answer is the same answer, and an invalid name is refused every time.
    assert parse_ip_literal("[::1]") == parse_ip_literal("[::1]") == ipaddress.IPv6Address("::1")
    for _ in range(2):
        with pytest.raises(ValueError, match="numeric address"):
            normalize_host("127.1")
