"""The inbound packet filter: rule compilation, every decision step of §B.4, flows, TSMP rejects."""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet.control import tailcfg
from tsnet.control.netmap import NetworkMap, Peer
from tsnet.key import NodePrivate
from tsnet.netstack.filter import (
    DEFAULT_FLOW_CAPACITY,
    FilterRuleError,
    FilterState,
    PacketFilter,
    Reason,
    RejectReason,
    Verdict,
    build_tsmp_reject,
    parse_tsmp_reject,
)
from tsnet.netstack.ip import ipv4_header, ipv6_header

SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01
ME4, ME6 = "100.64.0.1", "fd7a:115c:a1e0::1"
PEER4, PEER6 = "100.64.0.2", "fd7a:115c:a1e0::2"
OTHER4, OTHER6 = "100.64.0.3", "fd7a:115c:a1e0::3"
LOCAL = [ME4, ME6]


# -- packet builders (independent of the filter's own parsing) ------------------------------


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def ip_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    s, d = packed(src), packed(dst)
    if len(s) == 4:
        return ipv4_header(s, d, proto, len(payload)) + payload
    return ipv6_header(s, d, proto, len(payload)) + payload


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = SYN, data: bytes = b"") -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0 if flags == SYN else 2000, 0x50, flags, 65535, 0, 0)
    return ip_packet(src, dst, 6, seg + data)


def udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"hello") -> bytes:
    return ip_packet(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def sctp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ip_packet(src, dst, 132, struct.pack("!HHII", sport, dport, 7, 0))


def icmp(src: str, dst: str, icmp_type: int, code: int = 0, body: bytes = b"\x00\x01\x00\x02abcd") -> bytes:
    proto = 58 if ":" in src else 1
    return ip_packet(src, dst, proto, bytes((icmp_type, code, 0, 0)) + body)


def v4_fragment(src: str, dst: str, proto: int, payload: bytes, offset_blocks: int, more: bool) -> bytes:
    pkt = bytearray(ip_packet(src, dst, proto, payload))
    pkt[6:8] = (offset_blocks | (0x2000 if more else 0)).to_bytes(2, "big")
    pkt[10:12] = b"\x00\x00"
    total = sum(struct.unpack("!10H", bytes(pkt[:20])))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    pkt[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(pkt)


def rule(src: tuple[str, ...], dsts: tuple[tuple[str, int, int], ...], protos: tuple[int, ...] | None = None,
         **kw) -> tailcfg.FilterRule:
    return tailcfg.FilterRule(
        src_ips=src,
        dst_ports=tuple(tailcfg.NetPortRange(ip=ip, ports=tailcfg.PortRange(first=a, last=b)) for ip, a, b in dsts),
        ip_proto=protos,
        **kw,
    )


def state_for(*rules: tailcfg.FilterRule, **kw) -> FilterState:
    return FilterState(PacketFilter.from_rules(rules, LOCAL, **kw))


def reason(state: FilterState, packet: bytes) -> Reason:
    return state.check_inbound(packet).reason


# -- SrcIPs / DstPorts forms ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "allowed", "denied"),
    [
        ("*", [PEER4, OTHER4, "8.8.8.8"], []),
        ("100.64.0.0/30", [PEER4, OTHER4, "100.64.0.0"], ["100.64.0.4", "100.63.255.255"]),
        ("100.64.0.2", [PEER4], [OTHER4]),
        ("100.64.0.2-100.64.0.5", [PEER4, OTHER4, "100.64.0.5"], ["100.64.0.1", "100.64.0.6"]),
        ("100.64.0.2/32", [PEER4], [OTHER4]),
    ],
)
def test_src_forms_v4(src: str, allowed: list[str], denied: list[str]) -> None:
    state = state_for(rule((src,), (("*", 22, 22),)))
    for addr in allowed:
        assert reason(state, tcp(addr, ME4, 4000, 22)) is Reason.TCP_RULE, addr
    for addr in denied:
        assert reason(state, tcp(addr, ME4, 4000, 22)) is Reason.NO_RULE, addr


@pytest.mark.parametrize(
    ("src", "allowed", "denied"),
    [
        ("*", [PEER6, "2001:db8::1"], []),
        ("fd7a:115c:a1e0::/126", [PEER6, OTHER6], ["fd7a:115c:a1e0::4"]),
        (PEER6, [PEER6], [OTHER6]),
        ("fd7a:115c:a1e0::2-fd7a:115c:a1e0::10", [PEER6, "fd7a:115c:a1e0::10"], ["fd7a:115c:a1e0::11"]),
    ],
)
def test_src_forms_v6(src: str, allowed: list[str], denied: list[str]) -> None:
    state = state_for(rule((src,), (("*", 22, 22),)))
    for addr in allowed:
        assert reason(state, tcp(addr, ME6, 4000, 22)) is Reason.TCP_RULE, addr
    for addr in denied:
        assert reason(state, tcp(addr, ME6, 4000, 22)) is Reason.NO_RULE, addr


def test_star_covers_both_families_but_v4_source_does_not_match_v6() -> None:
    state = state_for(rule((PEER4,), (("*", 80, 80),)))
    assert reason(state, tcp(PEER4, ME4, 1, 80)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, ME6, 1, 80)) is Reason.NO_RULE


BAD_ENTRIES = [
    "100.64.0.1/24",  # host bits set
    "100.64.0.0/33",
    "not-an-ip",
    "100.64.0.5-100.64.0.2",  # reversed range
    "100.64.0.1-fd7a::1",  # mixed families
    "1-2-3",
    "fe80::1%eth0",
    "cap:",
    "",
]


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_bad_source_entries_are_ignored_with_a_warning(entry: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tsnet.netstack.filter"):
        f = PacketFilter.from_rules([rule((entry, PEER4), (("*", 22, 22),))], LOCAL)
    assert len(f.warnings) == 1 and "source" in f.warnings[0]
    assert any("ignoring" in r.getMessage() for r in caplog.records)
    # The good entry of the same rule still works; the bad one admits nothing.
    state = FilterState(f)
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.NO_RULE


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_bad_entries_raise_in_strict_mode(entry: str) -> None:
    with pytest.raises(FilterRuleError):
        PacketFilter.from_rules([rule((entry,), (("*", 22, 22),))], LOCAL, strict=True)


def test_cap_destination_is_ignored() -> None:
    f = PacketFilter.from_rules([rule(("*",), (("cap:foo", 0, 65535), (ME4, 22, 22)))], LOCAL)
    assert len(f.warnings) == 1 and "capability" in f.warnings[0]
    state = FilterState(f)
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 23)) is Reason.NO_RULE
    with pytest.raises(FilterRuleError):
        PacketFilter.from_rules([rule(("*",), (("cap:foo", 0, 65535),))], LOCAL, strict=True)


def test_legacy_bits_discard_every_rule() -> None:
    good = rule(("*",), (("*", 0, 65535),))
    old_src = tailcfg.FilterRule(src_ips=("*",), src_bits=(32,),
                                 dst_ports=(tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(0, 65535)),))
    old_dst = tailcfg.FilterRule(src_ips=("*",), dst_ports=(
        tailcfg.NetPortRange(ip=ME4, bits=32, ports=tailcfg.PortRange(0, 65535)),))
    for bad in (old_src, old_dst):
        f = PacketFilter.from_rules([good, bad], LOCAL)
        assert len(f.warnings) == 1 and f.rule_count == 0
        state = FilterState(f)
        assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.NO_RULE
        assert reason(state, tcp(PEER4, ME4, 1, 22, ACK)) is Reason.TCP_NON_SYN  # replies still pass
        with pytest.raises(FilterRuleError):
            PacketFilter.from_rules([good, bad], LOCAL, strict=True)


def test_dst_forms_and_port_ranges() -> None:
    state = state_for(
        rule(("*",), ((ME4, 1000, 2000), ("100.64.0.0/30", 443, 443),
                      ("fd7a:115c:a1e0::0-fd7a:115c:a1e0::ff", 22, 23))),
    )
    assert reason(state, tcp(PEER4, ME4, 1, 1000)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 2000)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 1500)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 999)) is Reason.NO_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 2001)) is Reason.NO_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 443)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, ME6, 1, 23)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, ME6, 1, 24)) is Reason.NO_RULE


def test_rule_for_another_destination_does_not_admit() -> None:
    state = FilterState(PacketFilter.from_rules([rule(("*",), ((OTHER4, 0, 65535),))], LOCAL + [OTHER4 + "/32"]))
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.NO_RULE
    assert reason(state, tcp(PEER4, OTHER4, 1, 22)) is Reason.TCP_RULE


def test_reference_table() -> None:
    """The decision table tailscaled's own filter tests use (rules and packets restated here)."""
    allowed_proto, denied_proto, all_ports = 116, 127, (0, 65535)
    rules = [
        rule(("8.1.1.1", "8.2.2.2"), (("1.2.3.4", 22, 22), ("5.6.7.8", 23, 24))),
        rule(("9.1.1.1", "9.2.2.2"), (("1.2.3.4", 22, 22), ("5.6.7.8", 23, 24)), protos=(132,)),
        rule(("8.1.1.1", "8.2.2.2"), (("5.6.7.8", 27, 28),)),
        rule(("2.2.2.2",), (("8.1.1.1", 22, 22),)),
        rule(("0.0.0.0/0",), (("100.122.98.50", *all_ports),)),
        rule(("0.0.0.0/0",), (("0.0.0.0/0", 443, 443),)),
        rule(("153.1.1.1", "153.1.1.2", "153.3.3.3"), (("1.2.3.4", 999, 999),)),
        rule(("::1", "::2"), (("2001::1", 22, 22), ("2001::2", 22, 22))),
        rule(("::/0",), (("::/0", 443, 443),)),
        rule(("0.0.0.0/0",), (("0.0.0.0/0", *all_ports),), protos=(allowed_proto,)),
        rule(("::/0",), (("::/0", *all_ports),), protos=(allowed_proto,)),
        rule(("cap:cap-hit-1234-ssh",), (("1.2.3.4", 22, 22),)),
    ]
    local = ["100.122.98.50", "1.2.3.4", "5.6.7.8", "102.102.102.102", "119.119.119.119", "8.1.0.0/16", "2001::/16"]
    state = FilterState(PacketFilter.from_rules(rules, local, peer_caps={"10.0.0.1": {"cap-hit-1234-ssh"}}))
    table = [
        (True, 6, "8.1.1.1", "1.2.3.4", 999, 22), (True, 1, "8.1.1.1", "1.2.3.4", 0, 0),
        (False, 6, "8.1.1.1", "1.2.3.4", 0, 0), (True, 6, "8.1.1.1", "1.2.3.4", 0, 22),
        (False, 6, "8.1.1.1", "1.2.3.4", 0, 21), (True, 6, "8.2.2.2", "1.2.3.4", 0, 22),
        (False, 6, "8.2.2.2", "1.2.3.4", 0, 23), (False, 6, "8.3.3.3", "1.2.3.4", 0, 22),
        (True, 6, "8.1.1.1", "5.6.7.8", 0, 23), (True, 6, "8.1.1.1", "5.6.7.8", 0, 24),
        (False, 6, "8.1.1.3", "5.6.7.8", 0, 24), (False, 6, "8.1.1.1", "5.6.7.8", 0, 22),
        (True, 6, "17.34.51.68", "8.1.34.51", 0, 443), (False, 6, "17.34.51.68", "8.1.34.51", 0, 444),
        (True, 6, "17.34.51.68", "100.122.98.50", 0, 999), (True, 6, "17.34.51.68", "100.122.98.50", 0, 0),
        (True, 6, "::1", "2001::1", 0, 22), (True, 58, "::1", "2001::1", 0, 0),
        (True, 6, "::2", "2001::1", 0, 22), (True, 6, "::2", "2001::2", 0, 22),
        (False, 6, "::1", "2001::1", 0, 23), (False, 6, "::1", "2001::3", 0, 22),
        (False, 6, "::3", "2001::1", 0, 22), (True, 6, "::1", "2001::1", 0, 443),
        (False, 6, "::1", "2001::1", 0, 444),
        (False, 6, "8.1.1.1", "16.32.48.64", 0, 443), (False, 6, "1::", "2602::1", 0, 443),  # not local
        (False, 132, "8.1.1.1", "1.2.3.4", 999, 22), (True, 132, "9.1.1.1", "1.2.3.4", 999, 22),
        (True, allowed_proto, "1.2.3.4", "5.6.7.8", 0, 0), (True, allowed_proto, "2001::1", "2001::2", 0, 0),
        (False, denied_proto, "1.2.3.4", "5.6.7.8", 0, 0), (False, denied_proto, "2001::1", "2001::2", 0, 0),
        (True, 6, "10.0.0.1", "1.2.3.4", 30000, 22), (False, 6, "10.0.0.2", "1.2.3.4", 30000, 22),
    ]
    for want, proto, src, dst, sport, dport in table:
        if proto == 6:
            packets = [tcp(src, dst, sport, dport, SYN), udp(src, dst, sport, dport)]  # TCP and UDP alike
        elif proto == 132:
            packets = [sctp(src, dst, sport, dport)]
        elif proto in (1, 58):
            packets = [icmp(src, dst, 8 if proto == 1 else 128)]
        else:
            packets = [ip_packet(src, dst, proto, bytes(8))]
        for pkt in packets:
            assert state.check_inbound(pkt).accepted is want, (want, proto, src, dst, sport, dport)


# -- protocols ------------------------------------------------------------------------------


def test_tcp_non_syn_passes_without_any_rule() -> None:
    state = state_for()
    for flags in (ACK, ACK | SYN, RST, FIN | ACK, ACK | 0x08, 0):
        assert reason(state, tcp(OTHER4, ME4, 80, 40000, flags, b"data")) is Reason.TCP_NON_SYN
        assert reason(state, tcp(OTHER6, ME6, 80, 40000, flags, b"data")) is Reason.TCP_NON_SYN
    assert reason(state, tcp(OTHER4, ME4, 80, 40000, SYN)) is Reason.NO_RULE
    assert reason(state, tcp(OTHER4, ME4, 80, 40000, SYN | FIN)) is Reason.NO_RULE  # still a SYN without ACK
    assert reason(state, tcp(OTHER6, ME6, 80, 40000, SYN)) is Reason.NO_RULE


def test_ip_proto_empty_means_tcp_udp_icmp() -> None:
    state = state_for(rule((PEER4, PEER6), (("*", 53, 53),)))
    assert reason(state, tcp(PEER4, ME4, 1, 53)) is Reason.TCP_RULE
    assert reason(state, udp(PEER4, ME4, 1, 53)) is Reason.UDP_RULE
    assert reason(state, udp(PEER6, ME6, 1, 53)) is Reason.UDP_RULE
    assert reason(state, sctp(PEER4, ME4, 1, 53)) is Reason.NO_RULE  # SCTP must be listed


def test_ip_proto_listed() -> None:
    state = state_for(rule((PEER4,), (("*", 53, 53),), protos=(17, 132)))
    assert reason(state, udp(PEER4, ME4, 1, 53)) is Reason.UDP_RULE
    assert reason(state, sctp(PEER4, ME4, 1, 53)) is Reason.UDP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 53)) is Reason.NO_RULE
    # Out-of-range numbers are ignored; a rule left with none matches nothing.
    state = state_for(rule((PEER4,), (("*", 53, 53),), protos=(300,)))
    assert reason(state, udp(PEER4, ME4, 1, 53)) is Reason.NO_RULE


def test_unsolicited_udp_denied_and_replies_pass_via_flow_cache() -> None:
    state = state_for()
    assert reason(state, udp(PEER4, ME4, 53, 40000)) is Reason.NO_RULE
    assert state.note_outbound(udp(ME4, PEER4, 40000, 53)).reason is Reason.OUTBOUND
    assert state.flow_count == 1
    assert reason(state, udp(PEER4, ME4, 53, 40000)) is Reason.FLOW
    # Only the exact reversed 5-tuple.
    assert reason(state, udp(PEER4, ME4, 54, 40000)) is Reason.NO_RULE
    assert reason(state, udp(PEER4, ME4, 53, 40001)) is Reason.NO_RULE
    assert reason(state, udp(OTHER4, ME4, 53, 40000)) is Reason.NO_RULE
    assert reason(state, sctp(PEER4, ME4, 53, 40000)) is Reason.NO_RULE  # another protocol
    # IPv6.
    state.note_outbound(udp(ME6, PEER6, 40000, 53))
    assert reason(state, udp(PEER6, ME6, 53, 40000)) is Reason.FLOW
    assert reason(state, udp(OTHER6, ME6, 53, 40000)) is Reason.NO_RULE
    # SCTP flows too.
    state.note_outbound(sctp(ME4, PEER4, 5000, 6000))
    assert reason(state, sctp(PEER4, ME4, 6000, 5000)) is Reason.FLOW
    assert reason(state, udp(PEER4, ME4, 6000, 5000)) is Reason.NO_RULE


def test_flow_cache_is_a_bounded_lru() -> None:
    state = FilterState(PacketFilter.from_rules((), LOCAL), capacity=4)
    for port in range(1, 5):
        state.note_outbound(udp(ME4, PEER4, port, 53))
    # Touch flow 1 by a reply so it becomes most recent; then add a fifth: flow 2 goes.
    assert reason(state, udp(PEER4, ME4, 53, 1)) is Reason.FLOW
    state.note_outbound(udp(ME4, PEER4, 5, 53))
    assert state.flow_count == 4
    assert reason(state, udp(PEER4, ME4, 53, 2)) is Reason.NO_RULE
    for port in (1, 3, 4, 5):
        assert reason(state, udp(PEER4, ME4, 53, port)) is Reason.FLOW
    assert FilterState().capacity == DEFAULT_FLOW_CAPACITY == 512
    with pytest.raises(ValueError):
        FilterState(capacity=0)


def test_outbound_tcp_and_icmp_are_not_recorded() -> None:
    state = state_for()
    assert state.note_outbound(tcp(ME4, PEER4, 1, 2, SYN)).accepted
    assert state.note_outbound(icmp(ME4, PEER4, 8)).accepted
    assert state.flow_count == 0


def test_icmp_echo_request_by_rule_and_reply_always() -> None:
    # Any rule from the source to our address (any port, any protocol) allows echo requests.
    state = state_for(rule((PEER4, PEER6), ((ME4, 22, 22), (ME6, 22, 22)), protos=(6,)))
    assert reason(state, icmp(PEER4, ME4, 8)) is Reason.ICMP_RULE
    assert reason(state, icmp(PEER6, ME6, 128)) is Reason.ICMP_RULE
    assert reason(state, icmp(OTHER4, ME4, 8)) is Reason.NO_RULE
    assert reason(state, icmp(OTHER6, ME6, 128)) is Reason.NO_RULE
    # Replies and errors need no rule.
    for v4_type in (0, 3, 11, 12):
        assert reason(state, icmp(OTHER4, ME4, v4_type)) is Reason.ICMP_RESPONSE
    for v6_type in (129, 1, 2, 3, 4):
        assert reason(state, icmp(OTHER6, ME6, v6_type)) is Reason.ICMP_RESPONSE
    # An echo reply with a nonzero code or shorter than 8 bytes is not a reply.
    assert reason(state, icmp(OTHER4, ME4, 0, code=1)) is Reason.NO_RULE
    assert reason(state, icmp(OTHER4, ME4, 0, body=b"")) is Reason.NO_RULE
    # Other ICMP types are treated like requests.
    assert reason(state, icmp(OTHER4, ME4, 13)) is Reason.NO_RULE
    assert reason(state, icmp(PEER4, ME4, 13)) is Reason.ICMP_RULE


def test_tsmp_always_accepted() -> None:
    state = state_for()
    assert reason(state, ip_packet(OTHER4, ME4, 99, b"p12345678")) is Reason.TSMP
    assert reason(state, ip_packet(OTHER6, ME6, 99, b"p12345678")) is Reason.TSMP
    # Shorter than the 7-byte minimum, or fragmented: dropped.
    assert reason(state, ip_packet(OTHER4, ME4, 99, b"p1234")) is Reason.MALFORMED
    assert reason(state, v4_fragment(OTHER4, ME4, 99, b"p12345678", 0, more=True)) is Reason.BAD_FRAGMENT


def test_other_protocols_need_all_ports() -> None:
    gre = 47
    state = state_for(rule((PEER4,), (("*", 0, 65535),), protos=(gre,)),
                      rule((OTHER4,), (("*", 0, 1000),), protos=(gre,)))
    assert reason(state, ip_packet(PEER4, ME4, gre, b"x" * 8)) is Reason.OTHER_RULE
    assert reason(state, ip_packet(OTHER4, ME4, gre, b"x" * 8)) is Reason.OTHER_PROTOCOL
    assert reason(state, ip_packet(PEER4, ME4, 50, b"x" * 8)) is Reason.OTHER_PROTOCOL
    # IPv6 extension headers are not walked: a Fragment header is protocol 44.
    state = state_for(rule((PEER6,), (("*", 0, 65535),), protos=(44,)))
    assert reason(state, ip_packet(PEER6, ME6, 44, b"\x11\x00\x00\x01abcd" + b"x" * 8)) is Reason.OTHER_RULE
    assert reason(state, ip_packet(OTHER6, ME6, 44, b"\x11\x00\x00\x01abcd" + b"x" * 8)) is Reason.OTHER_PROTOCOL


def test_unknown_protocols_dropped_even_when_allowed() -> None:
    state = state_for(rule(("*",), (("*", 0, 65535),), protos=(0, 255)))
    assert reason(state, ip_packet(PEER6, ME6, 0, b"\x06\x00" + bytes(6))) is Reason.UNKNOWN_PROTOCOL  # hop-by-hop
    assert reason(state, ip_packet(PEER4, ME4, 255, bytes(8))) is Reason.UNKNOWN_PROTOCOL
    assert reason(state, ip_packet(PEER4, ME4, 0, bytes(8))) is Reason.UNKNOWN_PROTOCOL


# -- sanity steps -------------------------------------------------------------------------


def test_local_nets() -> None:
    f = PacketFilter.from_rules([rule(("*",), (("*", 0, 65535),))], [ME4, ME6, "10.0.0.0/24", "fd00::/64"])
    state = FilterState(f)
    assert reason(state, tcp(PEER4, "10.0.0.7", 1, 80)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, "fd00::7", 1, 80)) is Reason.TCP_RULE
    for dst in ("10.0.1.7", OTHER4, "100.100.100.100"):
        assert reason(state, tcp(PEER4, dst, 1, 80)) is Reason.NOT_LOCAL
        assert reason(state, tcp(PEER4, dst, 1, 80, ACK)) is Reason.NOT_LOCAL  # even non-SYN
        assert reason(state, ip_packet(PEER4, dst, 99, b"p12345678")) is Reason.NOT_LOCAL
    assert reason(state, tcp(PEER6, "fd00:0:0:1::7", 1, 80)) is Reason.NOT_LOCAL
    with pytest.raises(ValueError):
        PacketFilter.from_rules((), ["10.0.0.1/24"])  # host bits in a local prefix
    # Interfaces count as our address only (not their subnet).
    f = PacketFilter.from_rules((), [ipaddress.ip_interface("100.64.0.1/10")])
    assert reason(FilterState(f), tcp(PEER4, ME4, 1, 2, ACK)) is Reason.TCP_NON_SYN
    assert reason(FilterState(f), tcp(PEER4, OTHER4, 1, 2, ACK)) is Reason.NOT_LOCAL


def test_multicast_and_link_local_dropped() -> None:
    f = PacketFilter.from_rules([rule(("*",), (("*", 0, 65535),))],
                                [ME4, ME6, "0.0.0.0/0", "::/0"])  # even when "local"
    state = FilterState(f)
    assert reason(state, udp(PEER4, "224.0.0.251", 5353, 5353)) is Reason.MULTICAST
    assert reason(state, udp(PEER4, "239.255.255.250", 1900, 1900)) is Reason.MULTICAST
    assert reason(state, udp(PEER6, "ff02::fb", 5353, 5353)) is Reason.MULTICAST
    assert reason(state, tcp(PEER4, "169.254.1.1", 1, 80, ACK)) is Reason.LINK_LOCAL
    assert reason(state, tcp(PEER6, "fe80::1", 1, 80, ACK)) is Reason.LINK_LOCAL
    assert reason(state, tcp(PEER6, "febf::1", 1, 80, ACK)) is Reason.LINK_LOCAL
    assert reason(state, tcp(PEER6, "fec0::1", 1, 80, ACK)) is Reason.TCP_NON_SYN
    # The cloud metadata address is the exception.
    assert reason(state, tcp(PEER4, "169.254.169.254", 1, 80)) is Reason.TCP_RULE
    # Outbound too.
    assert state.note_outbound(udp(ME4, "224.0.0.251", 5353, 5353)).reason is Reason.MULTICAST
    assert state.note_outbound(udp(ME6, "fe80::1", 5353, 5353)).reason is Reason.LINK_LOCAL
    assert state.outbound_drops[Reason.MULTICAST] == 1
    assert state.flow_count == 0


def test_big_packets_get_the_same_decisions() -> None:
    # IPv4 packets of 34+ bytes and IPv6 of 54+ take a fast path; it must never decide differently.
    state = FilterState(PacketFilter.from_rules(
        [rule((PEER4, PEER6), (("*", 22, 22),))], LOCAL + ["224.0.0.1", "169.254.7.7", "ff02::1", "fe80::1"]))
    state.note_outbound(udp(ME4, PEER4, 5000, 53))
    state.note_outbound(udp(ME6, PEER6, 5000, 53))
    small_and_big = [
        (tcp(OTHER4, ME4, 80, 40000, ACK), tcp(OTHER4, ME4, 80, 40000, ACK, bytes(1000))),
        (tcp(OTHER4, ME4, 4000, 22, SYN), tcp(OTHER4, ME4, 4000, 22, SYN, bytes(1000))),
        (tcp(PEER4, ME4, 4000, 22, SYN), tcp(PEER4, ME4, 4000, 22, SYN, bytes(1000))),
        (tcp(OTHER6, ME6, 80, 40000, ACK), tcp(OTHER6, ME6, 80, 40000, ACK, bytes(1000))),
        (tcp(OTHER6, ME6, 4000, 22, SYN), tcp(OTHER6, ME6, 4000, 22, SYN, bytes(1000))),
        (udp(PEER4, ME4, 53, 5000, b""), udp(PEER4, ME4, 53, 5000, bytes(1000))),
        (udp(PEER4, ME4, 53, 5000, b""), udp(PEER4, ME4, 53, 5000, bytes(6))),  # 34 bytes: the v4 minimum
        (udp(PEER4, ME4, 53, 5001, b""), udp(PEER4, ME4, 53, 5001, bytes(1000))),
        (udp(PEER6, ME6, 53, 5000, b""), udp(PEER6, ME6, 53, 5000, bytes(1000))),
        (udp(OTHER6, ME6, 53, 5000, b""), udp(OTHER6, ME6, 53, 5000, bytes(1000))),
        (tcp(OTHER4, "224.0.0.1", 80, 40000, ACK), tcp(OTHER4, "224.0.0.1", 80, 40000, ACK, bytes(1000))),
        (tcp(OTHER4, "169.254.7.7", 80, 40000, ACK), tcp(OTHER4, "169.254.7.7", 80, 40000, ACK, bytes(1000))),
        (udp(PEER6, "ff02::1", 53, 5000, b""), udp(PEER6, "ff02::1", 53, 5000, bytes(1000))),
        (tcp(OTHER6, "fe80::1", 80, 40000, ACK), tcp(OTHER6, "fe80::1", 80, 40000, ACK, bytes(1000))),
        (tcp(OTHER4, OTHER4, 80, 40000, ACK), tcp(OTHER4, OTHER4, 80, 40000, ACK, bytes(1000))),
    ]
    for small, big in small_and_big:
        assert state.check_inbound(small) is state.check_inbound(big), small.hex()
    # IP options, fragments never take it.
    for flags, want in ((ACK, Reason.TCP_NON_SYN), (SYN, Reason.NO_RULE)):
        seg = struct.pack("!HHIIBBHHH", 80, 40000, 1, 2, 0x50, flags, 65535, 0, 0) + bytes(100)
        hdr = bytearray(ipv4_header(packed(OTHER4), packed(ME4), 6, len(seg) + 4))
        hdr[0] = 0x46  # one word of options (a NOP-padded end-of-list)
        with_options = bytes(hdr) + b"\x01\x01\x01\x00" + seg
        assert reason(state, with_options) is want
        state.note_outbound(udp(ME4, OTHER4, 7000, 53))
    udp_hdr = bytearray(ipv4_header(packed(OTHER4), packed(ME4), 17, 4 + 8 + 100))
    udp_hdr[0] = 0x46
    assert reason(state, bytes(udp_hdr) + bytes(4) + struct.pack("!HHHH", 53, 7000, 108, 0) + bytes(100)) is Reason.FLOW
    head = struct.pack("!HHIIBBHHH", 4000, 22, 1, 0, 0x50, SYN, 65535, 0, 0) + bytes(1000)
    assert reason(state, v4_fragment(OTHER4, ME4, 6, head, 0, more=True)) is Reason.NO_RULE
    assert reason(state, v4_fragment(OTHER4, ME4, 6, head, 1, more=True)) is Reason.BAD_FRAGMENT
    # A truncated big packet is malformed, not fast-accepted.
    assert reason(state, tcp(OTHER4, ME4, 80, 40000, ACK, bytes(1000))[:900]) is Reason.MALFORMED
    assert reason(state, tcp(OTHER6, ME6, 80, 40000, ACK, bytes(1000))[:900]) is Reason.MALFORMED


def test_ipv4_fragments() -> None:
    state = state_for(rule((PEER4,), (("*", 22, 22),)))
    head = struct.pack("!HHIIBBHHH", 4000, 22, 1, 0, 0x50, SYN, 65535, 0, 0) + bytes(60)
    # A first fragment is filtered on its (whole) transport header.
    assert reason(state, v4_fragment(PEER4, ME4, 6, head, 0, more=True)) is Reason.TCP_RULE
    assert reason(state, v4_fragment(OTHER4, ME4, 6, head, 0, more=True)) is Reason.NO_RULE
    # A first fragment too short for the TCP header is dropped.
    assert reason(state, v4_fragment(PEER4, ME4, 6, head[:16], 0, more=True)) is Reason.MALFORMED
    assert reason(state, v4_fragment(PEER4, ME4, 17, b"\x00\x01", 0, more=True)) is Reason.MALFORMED
    # Later fragments pass (the stack reassembles; the first one was the gate)...
    assert reason(state, v4_fragment(OTHER4, ME4, 6, bytes(40), 10, more=True)) is Reason.FRAGMENT
    assert reason(state, v4_fragment(OTHER4, ME4, 17, bytes(40), 185, more=False)) is Reason.FRAGMENT
    # ...unless they start inside the first 80 bytes (RFC 1858 overlap).
    assert reason(state, v4_fragment(OTHER4, ME4, 6, bytes(40), 1, more=True)) is Reason.BAD_FRAGMENT
    assert reason(state, v4_fragment(OTHER4, ME4, 6, bytes(40), 9, more=False)) is Reason.BAD_FRAGMENT
    # ...or go to multicast / link-local destinations.
    assert reason(state, v4_fragment(OTHER4, "224.0.0.1", 17, bytes(40), 20, more=False)) is Reason.MULTICAST
    assert reason(state, v4_fragment(OTHER4, "169.254.0.1", 17, bytes(40), 20, more=False)) is Reason.LINK_LOCAL


def test_malformed_headers() -> None:
    state = FilterState(PacketFilter.from_rules([rule(("*",), (("*", 0, 65535),))], LOCAL))
    good = tcp(PEER4, ME4, 1, 22)
    assert reason(state, b"") is Reason.KEEPALIVE
    assert reason(state, good[:19]) is Reason.TOO_SHORT
    assert reason(state, good[:-1]) is Reason.MALFORMED  # total length beyond the buffer
    assert reason(state, ip_packet(PEER4, ME4, 6, bytes(19))) is Reason.MALFORMED  # truncated TCP header
    assert reason(state, ip_packet(PEER4, ME4, 17, bytes(7))) is Reason.MALFORMED
    assert reason(state, ip_packet(PEER4, ME4, 1, bytes(3))) is Reason.MALFORMED
    assert reason(state, bytes([0x44]) + good[1:]) is Reason.MALFORMED  # IHL 4
    assert reason(state, bytes([0x4F]) + good[1:]) is Reason.MALFORMED  # IHL beyond total
    assert reason(state, bytes([0x55]) + good[1:]) is Reason.MALFORMED  # version 5
    six = tcp(PEER6, ME6, 1, 22)
    assert reason(state, six[:39]) is Reason.MALFORMED
    assert reason(state, six[:-1]) is Reason.MALFORMED
    assert reason(state, ip_packet(PEER6, ME6, 6, bytes(19))) is Reason.MALFORMED
    assert reason(state, ip_packet(PEER6, ME6, 132, bytes(11))) is Reason.MALFORMED
    # Trailing bytes after the IP total length are ignored.
    assert reason(state, good + b"\x00" * 12) is Reason.TCP_RULE
    assert state.drops[Reason.MALFORMED] == 11
    assert state.drops[Reason.TOO_SHORT] == 1


def test_memoryview_and_bytearray_inputs() -> None:
    state = state_for(rule((PEER4,), (("*", 22, 22),)))
    pkt = tcp(PEER4, ME4, 1, 22)
    assert reason(state, memoryview(pkt)) is Reason.TCP_RULE
    assert reason(state, bytearray(pkt)) is Reason.TCP_RULE
    assert reason(state, memoryview(bytearray(b"\x00" * 8 + pkt))[8:]) is Reason.TCP_RULE
    state.note_outbound(memoryview(bytearray(udp(ME4, PEER4, 1, 2))))
    assert reason(state, bytearray(udp(PEER4, ME4, 2, 1))) is Reason.FLOW
    assert state.reject_for(memoryview(tcp(OTHER4, ME4, 1, 22))) is not None


# -- capabilities ---------------------------------------------------------------------------


def test_cap_sources() -> None:
    caps = {PEER4: {"example.com/cap/ssh"}, PEER6: {"example.com/cap/ssh"}, OTHER4: {"other"}}
    state = state_for(rule(("cap:example.com/cap/ssh",), (("*", 22, 22),)), peer_caps=caps)
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, ME6, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 23)) is Reason.NO_RULE
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.NO_RULE
    assert reason(state, tcp(OTHER6, ME6, 1, 22)) is Reason.NO_RULE
    assert reason(state, udp(PEER4, ME4, 1, 22)) is Reason.UDP_RULE
    assert reason(state, icmp(PEER4, ME4, 8)) is Reason.ICMP_RULE
    assert reason(state, icmp(OTHER4, ME4, 8)) is Reason.NO_RULE
    # Without capability information nobody matches.
    no_caps = state_for(rule(("cap:example.com/cap/ssh",), (("*", 22, 22),)))
    assert reason(no_caps, tcp(PEER4, ME4, 1, 22)) is Reason.NO_RULE


def test_cap_sources_do_not_open_portless_protocols() -> None:
    state = state_for(rule(("cap:x",), (("*", 0, 65535),), protos=(47,)), peer_caps={PEER4: {"x"}})
    assert reason(state, ip_packet(PEER4, ME4, 47, bytes(8))) is Reason.OTHER_PROTOCOL


def _node(node_id: int, addrs: tuple[str, ...], cap_map: dict | None = None) -> tailcfg.Node:
    return tailcfg.Node(id=node_id, key=NodePrivate.generate().public, addresses=addrs, cap_map=cap_map)


def test_from_netmap() -> None:
    rules = (
        rule(("cap:tailnet.example/can-ssh",), (("*", 22, 22),)),
        rule((f"{OTHER4}/32",), ((f"{ME4}/32", 80, 80),)),
    )
    me = _node(1, (f"{ME4}/32", f"{ME6}/128"))
    peers = (
        Peer.from_node(_node(2, (f"{PEER4}/32", f"{PEER6}/128"), {"tailnet.example/can-ssh": None})),
        Peer.from_node(_node(3, (f"{OTHER4}/32", f"{OTHER6}/128"))),
    )
    nm = NetworkMap(self_node=me, peers=peers, derp_map=None, dns_config=None, packet_filter=rules, cap_map={},
                    user_profiles={}, domain="", collect_services=False, control_time=None)
    state = FilterState(PacketFilter.from_netmap(nm, peerapi_port=34567))
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER6, ME6, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.NO_RULE
    assert reason(state, tcp(OTHER4, ME4, 1, 80)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 80)) is Reason.NO_RULE
    assert reason(state, tcp(OTHER4, "100.64.0.9", 1, 80)) is Reason.NOT_LOCAL
    # PeerAPI SYNs pass whatever the rules say (PeerAPI does its own authorization).
    assert reason(state, tcp(OTHER4, ME4, 1, 34567)) is Reason.PEERAPI
    assert reason(state, tcp(OTHER6, ME6, 1, 34567)) is Reason.PEERAPI
    assert state.reject_for(tcp(OTHER4, ME4, 1, 34567)) is None
    # A jailed peer (its allowed IPs) may not start connections even where a rule allows it.
    jailed = replace(nm, peers=(peers[0], Peer.from_node(replace(peers[1].node, is_jailed=True))))
    state = FilterState(PacketFilter.from_netmap(jailed))
    assert reason(state, tcp(OTHER4, ME4, 1, 80)) is Reason.JAILED
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    # An unparsable self address is skipped, not fatal; extra_local adds routes.
    odd = NetworkMap(self_node=_node(1, ("bogus", f"{ME4}/32")), peers=(), derp_map=None, dns_config=None,
                     packet_filter=(rule(("*",), (("*", 80, 80),)),), cap_map={}, user_profiles={}, domain="",
                     collect_services=False, control_time=None)
    state = FilterState(PacketFilter.from_netmap(odd, extra_local=["10.9.0.0/16"]))
    assert reason(state, tcp(PEER4, ME4, 1, 80)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, "10.9.1.1", 1, 80)) is Reason.TCP_RULE
    assert reason(state, tcp(PEER4, ME4, 1, 34567)) is Reason.NO_RULE  # no PeerAPI port given


def test_jailed_sources_cannot_start_anything() -> None:
    allow_all_rules = [rule(("*",), (("*", 0, 65535),), protos=(6, 17, 1, 58, 47))]
    state = FilterState(PacketFilter.from_rules(allow_all_rules, LOCAL, jailed=[f"{PEER4}/32", PEER6, "10.5.0.0/16"],
                                                peerapi_port=5555))
    state.note_outbound(udp(ME4, PEER4, 7000, 53))
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.JAILED
    assert reason(state, tcp(PEER6, ME6, 1, 22)) is Reason.JAILED
    assert reason(state, tcp("10.5.1.1", ME4, 1, 22)) is Reason.JAILED
    assert reason(state, udp(PEER4, ME4, 1, 22)) is Reason.JAILED
    assert reason(state, udp(PEER6, ME6, 1, 22)) is Reason.JAILED
    assert reason(state, icmp(PEER4, ME4, 8)) is Reason.JAILED
    assert reason(state, icmp(PEER6, ME6, 128)) is Reason.JAILED
    assert reason(state, ip_packet(PEER4, ME4, 47, bytes(8))) is Reason.JAILED
    assert reason(state, ip_packet(PEER6, ME6, 47, bytes(8))) is Reason.JAILED
    # What we started, replies, TSMP and PeerAPI still get through.
    assert reason(state, udp(PEER4, ME4, 53, 7000)) is Reason.FLOW
    assert reason(state, tcp(PEER4, ME4, 22, 40000, ACK)) is Reason.TCP_NON_SYN
    assert reason(state, icmp(PEER4, ME4, 0)) is Reason.ICMP_RESPONSE
    assert reason(state, ip_packet(PEER4, ME4, 99, b"p12345678")) is Reason.TSMP
    assert reason(state, tcp(PEER4, ME4, 1, 5555)) is Reason.PEERAPI
    # Others are unaffected; denied jailed SYNs get a shields-up reject.
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.TCP_RULE
    parsed = parse_tsmp_reject(state.reject_for(tcp(PEER4, ME4, 1, 22)))
    assert parsed is not None and parsed.reason == RejectReason.SHIELDS_UP
    accepted, rejects = state.filter_inbound([tcp(PEER4, ME4, 1, 22), tcp(OTHER4, ME4, 1, 22)])
    assert len(accepted) == 1 and parse_tsmp_reject(rejects[0]).reason == RejectReason.SHIELDS_UP


# -- special filters, replacement, counters ------------------------------------------------


def test_deny_all_and_allow_all() -> None:
    packets = [b"", tcp(PEER4, ME4, 1, 22), tcp(PEER4, ME4, 1, 22, ACK), udp(PEER6, ME6, 1, 2),
               ip_packet(PEER4, ME4, 99, b"p12345678"), b"junk"]
    deny = FilterState()
    assert deny.filter.is_deny_all
    for pkt in packets:
        result = deny.check_inbound(pkt)
        assert result.verdict is Verdict.DROP and result.reason is Reason.NO_FILTER and not result.accepted
        assert deny.reject_for(pkt) is None
    assert deny.drops[Reason.NO_FILTER] == len(packets)
    assert deny.note_outbound(udp(ME4, PEER4, 1, 2)).reason is Reason.NO_FILTER
    assert deny.flow_count == 0
    allow = FilterState(PacketFilter.allow_all())
    assert allow.filter.is_allow_all
    for pkt in packets:
        result = allow.check_inbound(pkt)
        assert result.verdict is Verdict.ACCEPT and result.accepted and result.reason is Reason.ALLOW_ALL
    assert allow.accepted == len(packets)


def test_live_replacement_keeps_flows_and_counters() -> None:
    state = state_for(rule((PEER4,), (("*", 22, 22),)))
    state.note_outbound(udp(ME4, OTHER4, 5000, 53))
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.NO_RULE
    state.set_filter(PacketFilter.from_rules([rule((OTHER4,), (("*", 22, 22),))], LOCAL))
    assert reason(state, tcp(PEER4, ME4, 1, 22)) is Reason.NO_RULE  # applies to the next packet
    assert reason(state, tcp(OTHER4, ME4, 1, 22)) is Reason.TCP_RULE
    assert reason(state, udp(OTHER4, ME4, 53, 5000)) is Reason.FLOW  # flow survived
    assert state.drops[Reason.NO_RULE] == 2
    state.set_filter(PacketFilter.deny_all())
    assert reason(state, udp(OTHER4, ME4, 53, 5000)) is Reason.NO_FILTER
    state.set_filter(PacketFilter.from_rules((), LOCAL))
    assert reason(state, udp(OTHER4, ME4, 53, 5000)) is Reason.FLOW
    state.clear_flows()
    assert reason(state, udp(OTHER4, ME4, 53, 5000)) is Reason.NO_RULE


def test_filter_inbound_batch() -> None:
    state = state_for(rule((PEER4,), (("*", 22, 22),)))
    state.note_outbound_batch([udp(ME4, PEER4, 7000, 53), udp(ME4, "224.0.0.1", 1, 1)])
    batch = [tcp(PEER4, ME4, 1, 22), tcp(OTHER4, ME4, 2, 22), udp(PEER4, ME4, 53, 7000),
             udp(OTHER4, ME4, 53, 7000), tcp(OTHER6, ME6, 3, 22), b"\x45" * 10]
    accepted, rejects = state.filter_inbound(batch)
    assert accepted == [batch[0], batch[2]]
    assert rejects == [build_tsmp_reject(ME4, OTHER4, 6, 2, 22)]  # IPv4 SYNs only
    assert state.accepted == 2 and state.rejects == 1
    assert state.drops[Reason.NO_RULE] == 3 and state.drops[Reason.TOO_SHORT] == 1
    assert state.outbound_drops[Reason.MULTICAST] == 1
    assert state.stats() == {"accepted": 2, "rejects": 1, "flows": 1, "dropped": 4, "dropped_no_rule": 3,
                             "dropped_too_short": 1, "outbound_dropped_multicast": 1}


# -- TSMP rejects ---------------------------------------------------------------------------


def test_reject_bytes_are_exact() -> None:
    state = state_for()
    syn = tcp("100.101.102.103", ME4, 51234, 443)
    rej = state.reject_for(syn)
    ip4 = bytes.fromhex("4500001b 00000000 4063") + b"\x00\x00" + packed(ME4) + packed("100.101.102.103")
    ck = sum(struct.unpack("!10H", ip4))
    while ck > 0xFFFF:
        ck = (ck & 0xFFFF) + (ck >> 16)
    ip4 = ip4[:10] + (~ck & 0xFFFF).to_bytes(2, "big") + ip4[12:]
    assert rej == ip4 + b"!" + bytes([6]) + b"A" + (51234).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert len(rej) == 27
    assert state.rejects == 1
    parsed = parse_tsmp_reject(rej)
    assert parsed is not None
    assert (str(parsed.src), str(parsed.dst), parsed.proto, parsed.reason, parsed.src_port, parsed.dst_port) == (
        ME4, "100.101.102.103", 6, RejectReason.ACL, 51234, 443)
    # The reject is itself TSMP, which the peer's filter always accepts.
    peer = FilterState(PacketFilter.from_rules((), ["100.101.102.103"]))
    assert peer.check_inbound(rej).reason is Reason.TSMP


def test_reject_only_for_denied_ipv4_syns() -> None:
    state = state_for(rule((PEER4,), (("*", 22, 22),)))
    assert state.reject_for(tcp(PEER4, ME4, 1, 22)) is None  # accepted
    assert state.reject_for(tcp(OTHER4, ME4, 1, 22, ACK)) is None  # not a SYN
    assert state.reject_for(tcp(OTHER6, ME6, 1, 22)) is None  # IPv6
    assert state.reject_for(udp(OTHER4, ME4, 1, 22)) is None  # UDP
    assert state.reject_for(tcp(OTHER4, "100.64.0.99", 1, 22)) is None  # not ours: we do not speak for it
    assert state.reject_for(b"") is None and state.reject_for(b"\x45") is None
    assert state.reject_for(tcp(OTHER4, ME4, 1, 22)) is not None
    assert FilterState(PacketFilter.allow_all()).reject_for(tcp(OTHER4, ME4, 1, 22)) is None


def test_shields_up() -> None:
    state = FilterState(PacketFilter.shields_up(LOCAL))
    assert reason(state, tcp(PEER4, ME4, 80, 4000, ACK)) is Reason.TCP_NON_SYN
    assert reason(state, ip_packet(PEER4, ME4, 99, b"p12345678")) is Reason.TSMP
    rej = state.reject_for(tcp(PEER4, ME4, 4000, 22))
    parsed = parse_tsmp_reject(rej)
    assert parsed is not None and parsed.reason == RejectReason.SHIELDS_UP == ord("S")


def test_build_and_parse_tsmp_reject_v6_and_flags() -> None:
    pkt = build_tsmp_reject(ME6, PEER6, 17, 1, 2, RejectReason.HOST_FIREWALL, maybe_broken=True)
    assert len(pkt) == 40 + 8 and pkt[6] == 99 and pkt[40:] == b"!\x11W\x00\x01\x00\x02\x01"
    parsed = parse_tsmp_reject(pkt)
    assert parsed is not None and parsed.maybe_broken and parsed.reason == ord("W") and parsed.proto == 17
    with pytest.raises(ValueError):
        build_tsmp_reject(ME4, PEER6, 6, 1, 2)
    assert parse_tsmp_reject(ip_packet(PEER4, ME4, 99, b"p12345678")) is None  # a ping, not a reject
    assert parse_tsmp_reject(tcp(PEER4, ME4, 1, 2)) is None
    assert parse_tsmp_reject(b"") is None


# -- robustness -----------------------------------------------------------------------------

_FUZZ_FILTER = PacketFilter.from_rules(
    [rule(("*",), (("*", 0, 65535),), protos=(1, 6, 17, 47, 58, 132)), rule(("cap:x",), (("*", 1, 2),))],
    LOCAL + ["10.0.0.0/8"], peer_caps={PEER4: {"x"}})


def _v4(proto: int, ihl: int, frag: int, rest: bytes, dst: bytes) -> bytes:
    hdr = bytearray(ipv4_header(packed(PEER4), dst, proto, len(rest)))
    hdr[0] = 0x40 | ihl
    hdr[6:8] = frag.to_bytes(2, "big")
    return bytes(hdr) + rest


def _headers() -> st.SearchStrategy[bytes]:
    """Byte strings that mostly start like real IPv4/IPv6 headers, so fuzzing gets deep."""
    v4 = st.builds(_v4, st.sampled_from([0, 1, 6, 17, 47, 58, 99, 132, 255]), st.integers(0, 15),
                   st.integers(0, 0xFFFF), st.binary(max_size=80),
                   st.sampled_from([packed(ME4), packed("224.0.0.1"), packed("10.1.2.3"), packed("169.254.1.1")]))
    v6 = st.builds(lambda proto, plen, rest: ipv6_header(packed(PEER6), packed(ME6), proto, plen) + rest,
                   st.sampled_from([0, 6, 17, 44, 58, 99, 132, 255]), st.integers(0, 100), st.binary(max_size=80))
    return st.one_of(st.binary(max_size=100), v4, v6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packet=_headers(), kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_arbitrary_bytes_never_raise(packet: bytes, kind: type) -> None:
    # The filter catches its own bugs (drop + log); a fuzz case must not need that net.
    errors = _ErrorLog()
    logging.getLogger("tsnet.netstack.filter").addHandler(errors)
    try:
        _fuzz_one(packet, kind)
    finally:
        logging.getLogger("tsnet.netstack.filter").removeHandler(errors)
    assert errors.records == []


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _fuzz_one(packet: bytes, kind: type) -> None:
    state = FilterState(_FUZZ_FILTER, capacity=8)
    data = kind(packet)
    result = state.check_inbound(data)
    assert result.verdict in (Verdict.ACCEPT, Verdict.DROP)
    reject = state.reject_for(data)
    if reject is not None:
        assert parse_tsmp_reject(reject) is not None
    assert state.note_outbound(data).verdict in (Verdict.ACCEPT, Verdict.DROP)
    accepted, _ = state.filter_inbound([data, data])
    assert len(accepted) in (0, 2)
    parse_tsmp_reject(data)


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(st.text(max_size=40), max_size=4))
def test_arbitrary_rule_text_never_raises_unless_strict(entries: list[str]) -> None:
    f = PacketFilter.from_rules([tailcfg.FilterRule(
        src_ips=tuple(entries),
        dst_ports=tuple(tailcfg.NetPortRange(ip=e, ports=tailcfg.PortRange(0, 10)) for e in entries))], LOCAL)
    FilterState(f).check_inbound(tcp(PEER4, ME4, 1, 2))


def test_outbound_batch_tcp_shortcut_agrees_with_note_outbound() -> None:
    """note_outbound_batch inlines the common IPv4 TCP case; it must decide exactly as note_outbound."""
    good = tcp(ME4, PEER4, 1, 2, ACK)
    frag_mf = bytearray(good)
    frag_mf[6] |= 0x20
    frag_off = bytearray(good)
    frag_off[7] = 1
    too_long = bytearray(good)
    too_long[3] += 8  # total length beyond the packet
    cases = [good, tcp(ME4, "224.0.0.5", 1, 2, ACK), tcp(ME4, "169.254.1.1", 1, 2, ACK),
             bytes(frag_mf), bytes(frag_off), bytes(too_long), good[:39]]
    for packet in cases:
        one, batch = state_for(), state_for()
        expected = one.note_outbound(packet).accepted
        assert batch.note_outbound_batch([packet]) == ([packet] if expected else []), packet.hex()
        assert batch.outbound_drops == one.outbound_drops


def test_inbound_batch_tcp_shortcut_agrees_with_check_inbound() -> None:
    """filter_inbound inlines the common IPv4 TCP case; it must decide exactly as check_inbound."""
    good = tcp(PEER4, ME4, 1, 22, ACK)
    frag = bytearray(good)
    frag[6] |= 0x20
    cases = [good, tcp(PEER4, ME4, 1, 22, SYN), tcp(PEER4, ME4, 1, 22, SYN | ACK), tcp(PEER4, "100.64.9.9", 1, 22, ACK),
             bytes(frag), good[:39], tcp(OTHER4, ME4, 1, 23, ACK)]
    for rules in ((rule((PEER4,), (("*", 22, 22),)),), ()):
        for packet in cases:
            one, batch = state_for(*rules), state_for(*rules)
            expected = one.check_inbound(packet).accepted
            accepted, _ = batch.filter_inbound([packet])
            assert (accepted == [packet]) == expected, packet.hex()
            assert batch.drops == one.drops
