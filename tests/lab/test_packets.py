"""The test-side IPv4/ICMP/UDP helpers are correct (checked against known values, not only round trips)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab.packets import checksum, icmp_echo, ipv4, parse_icmp_echo, parse_ipv4, parse_udp, udp


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3 example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x01") == ~0x0100 & 0xFFFF  # odd length pads with zero


def test_known_ipv4_header() -> None:
    # A classic example header (Wikipedia "IPv4 header checksum"): checksum b861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861


def test_icmp_echo_round_trip_and_corruption() -> None:
    pkt = icmp_echo("10.0.0.1", "10.0.0.2", 0x1234, 7, b"payload")
    ip = parse_ipv4(pkt + b"\x00" * 12)  # WireGuard padding is ignored
    assert (ip.src, ip.dst, ip.proto) == (ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.2"), 1)
    echo = parse_icmp_echo(ip.payload)
    assert (echo.is_reply, echo.ident, echo.seq, echo.data) == (False, 0x1234, 7, b"payload")
    bad = bytearray(pkt)
    bad[-1] ^= 1
    with pytest.raises(ValueError, match="ICMP checksum"):
        parse_icmp_echo(parse_ipv4(bytes(bad)).payload)
    bad = bytearray(pkt)
    bad[8] ^= 1  # TTL
    with pytest.raises(ValueError, match="header checksum"):
        parse_ipv4(bytes(bad))


@settings(max_examples=200)
@given(data=st.binary(max_size=300), sport=st.integers(1, 65535), dport=st.integers(1, 65535))
def test_udp_round_trip(data: bytes, sport: int, dport: int) -> None:
    d = parse_udp(parse_ipv4(udp("10.1.2.3", "10.4.5.6", sport, dport, data)))
    assert (d.sport, d.dport, d.data) == (sport, dport, data)


def test_udp_bad_checksum_rejected() -> None:
    pkt = bytearray(udp("10.1.2.3", "10.4.5.6", 1, 2, b"abc"))
    pkt[-1] ^= 0xFF
    with pytest.raises(ValueError, match="UDP checksum"):
        parse_udp(parse_ipv4(bytes(pkt)))
    assert ipv4("1.2.3.4", "5.6.7.8", 17, b"")[:1] == b"\x45"
