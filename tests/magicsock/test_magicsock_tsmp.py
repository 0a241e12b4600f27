from __future__ import annotations

import ipaddress

from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPublic
from tsnet.magicsock.tsmp import DiscoKeyAdvertisement, parse_disco_key_advertisement

KEY = DiscoPublic(bytes(range(32)))
V4A, V4B = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("100.64.0.2")
V6A, V6B = ipaddress.ip_address("fd7a:115c:a1e0::1"), ipaddress.ip_address("fd7a:115c:a1e0::2")


def test_ipv4_layout_and_round_trip():
    pkt = DiscoKeyAdvertisement(V4A, V4B, KEY).to_packet()
    assert len(pkt) == 20 + 33
    assert pkt[:10] == bytes.fromhex("4500003500000000" "4063")
    # header checksum verifies to zero
    total = sum(int.from_bytes(pkt[i:i + 2], "big") for i in range(0, 20, 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    assert pkt[20] == 0x61 and pkt[21:] == KEY.raw
    assert parse_disco_key_advertisement(pkt) == DiscoKeyAdvertisement(V4A, V4B, KEY)


def test_ipv6_layout_and_round_trip():
    pkt = DiscoKeyAdvertisement(V6A, V6B, KEY).to_packet()
    assert pkt[:8] == bytes.fromhex("60000000" "0021" "63" "40")
    assert parse_disco_key_advertisement(pkt) == DiscoKeyAdvertisement(V6A, V6B, KEY)


def test_other_packets_are_not_adverts():
    pkt = bytearray(DiscoKeyAdvertisement(V4A, V4B, KEY).to_packet())
    pkt[20] = 0x62  # another TSMP type
    assert parse_disco_key_advertisement(bytes(pkt)) is None
    pkt[20], pkt[9] = 0x61, 6  # TCP
    assert parse_disco_key_advertisement(bytes(pkt)) is None
    assert parse_disco_key_advertisement(DiscoKeyAdvertisement(V4A, V4B, KEY).to_packet()[:52]) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_never_raises(data):
    parse_disco_key_advertisement(data)
