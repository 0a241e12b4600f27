"""Marshal vectors of tailscaled 1.96.4 (disco message plaintexts, hex), checked both ways."""

from __future__ import annotations

import pytest

from tsnet.key import DiscoPublic, NodePublic
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort


def raw32(**bytes_at):
    b = bytearray(32)
    for k, v in bytes_at.items():
        b[int(k[1:])] = v
    return bytes(b)


KEY = raw32(i1=1, i2=2, i30=30, i31=31)
C0 = raw32(i1=1, i2=2, i3=3, i30=30, i31=31)
C1 = raw32(i1=1, i2=2, i4=4, i30=30, i31=31)
TX = bytes(range(1, 13))
CHAL = bytes(range(32))
EP = d.UDPRelayEndpoint(
    server_disco=DiscoPublic(KEY),
    client_disco=(DiscoPublic(C0), DiscoPublic(C1)),
    lamport_id=123,
    vni=456,
    bind_lifetime_ns=1_000_000_000,
    steady_state_lifetime_ns=60_000_000_000,
    addr_ports=(AddrPort.parse("1.2.3.4:567"), AddrPort.parse("[2001::3456]:789")),
)
KEY_HEX = "00 01 02" + " 00" * 27 + " 1e 1f"
C0_HEX = "00 01 02 03" + " 00" * 26 + " 1e 1f"
C1_HEX = "00 01 02 00 04" + " 00" * 25 + " 1e 1f"
CHAL_HEX = " ".join(f"{i:02x}" for i in range(32))
TX_HEX = "01 02 03 04 05 06 07 08 09 0a 0b 0c"
ADDRS_HEX = "00 00 00 00 00 00 00 00 00 00 ff ff 01 02 03 04 02 37 20 01 00 00 00 00 00 00 00 00 00 00 00 00 34 56 03 15"
EP_HEX = (
    f"{KEY_HEX} {C0_HEX} {C1_HEX} 00 00 00 00 00 00 00 7b 00 00 01 c8 "
    f"00 00 00 00 3b 9a ca 00 00 00 00 0d f8 47 58 00 {ADDRS_HEX}"
)
BIND_HEX = f"00 00 00 01 00 00 00 02 {KEY_HEX} {CHAL_HEX}"

VECTORS = [
    ("ping", d.Ping(TX), f"01 00 {TX_HEX}"),
    ("ping_with_nodekey", d.Ping(TX, NodePublic(KEY)), f"01 00 {TX_HEX} {KEY_HEX}"),
    ("ping_with_padding", d.Ping(TX, None, 3), f"01 00 {TX_HEX} 00 00 00"),
    ("ping_with_padding_and_nodekey", d.Ping(TX, NodePublic(KEY), 3), f"01 00 {TX_HEX} {KEY_HEX} 00 00 00"),
    ("pong", d.Pong(TX, AddrPort.parse("2.3.4.5:1234")),
     f"02 00 {TX_HEX} 00 00 00 00 00 00 00 00 00 00 ff ff 02 03 04 05 04 d2"),
    ("pongv6", d.Pong(TX, AddrPort.parse("[fed0::12]:6666")),
     f"02 00 {TX_HEX} fe d0 00 00 00 00 00 00 00 00 00 00 00 00 00 12 1a 0a"),
    ("call_me_maybe", d.CallMeMaybe(()), "03 00"),
    ("call_me_maybe_endpoints", d.CallMeMaybe(EP.addr_ports), f"03 00 {ADDRS_HEX}"),
    ("bind", d.BindUDPRelayEndpoint(1, 2, DiscoPublic(KEY), CHAL), f"04 00 {BIND_HEX}"),
    ("bind_challenge", d.BindUDPRelayEndpointChallenge(1, 2, DiscoPublic(KEY), CHAL), f"05 00 {BIND_HEX}"),
    ("bind_answer", d.BindUDPRelayEndpointAnswer(1, 2, DiscoPublic(KEY), CHAL), f"06 00 {BIND_HEX}"),
    ("call_me_maybe_via", d.CallMeMaybeVia(EP), f"07 00 {EP_HEX}"),
    ("allocate_request", d.AllocateUDPRelayEndpointRequest((DiscoPublic(C0), DiscoPublic(C1)), 1),
     f"08 00 {C0_HEX} {C1_HEX} 00 00 00 01"),
    ("allocate_response", d.AllocateUDPRelayEndpointResponse(1, EP), f"09 00 00 00 00 01 {EP_HEX}"),
]


@pytest.mark.parametrize("name,msg,want", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector(name, msg, want):
    assert msg.to_bytes() == bytes.fromhex(want)
    assert d.parse_message(bytes.fromhex(want)) == msg
