"""Stack.receive_packets with an inbound filter ends exactly as filtering the batch first.

The node hands the stack its packet filter instead of running filter_inbound over each batch
beforehand; the stack then asks the filter only about packets that the filter's first rule
(non-SYN TCP to our addresses) does not accept anyway. Outcome, counters and TSMP rejects must
be those of the two-pass order.
"""

from __future__ import annotations

import random
from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netstack.netutil import A4, A6, ACK, B4, B6, FIN, RST, SYN, echo_request, ipv4, tcp, udp
from tsnet.control import tailcfg
from tsnet.netstack.filter import FilterState, PacketFilter
from tsnet.netstack.stack import Stack

OTHER4 = "100.64.0.9"  # a peer without rights
TS = b"\x01\x01\x08\x0a\x00\x00\x00\x05\x00\x00\x00\x00"
MSS = b"\x02\x04\x04\xd8"


def make_filter() -> FilterState:
    rules = [
        tailcfg.FilterRule(src_ips=(B4, B6), dst_ports=(
            tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(first=80, last=80)),
            tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(first=53, last=53)),
        ), ip_proto=(6, 17, 1, 58)),
    ]
    return FilterState(PacketFilter.from_rules(rules, [A4, A6]))


def make_stack() -> Stack:
    rnd = random.Random(3)
    s = Stack([A4, A6], now=0.0, rng=lambda n: bytes(rnd.getrandbits(8) for _ in range(n)), verify_checksums=False)
    s.tcp_listen(80)
    s.tcp_listen(81)
    s.udp_bind(A4, 53)
    s.udp_bind(A4, 54)
    return s


def pool() -> list[bytes]:
    """Packets a batch is drawn from: allowed, denied and malformed, every path of the stack."""
    out = []
    for src in (B4, OTHER4):
        for port in (80, 81, 82):
            out.append(tcp(src, A4, 5555, port, 1000, 0, SYN, options=MSS + TS))  # SYN (the filter's concern)
            out.append(tcp(src, A4, 5555, port, 1001, 1, ACK, options=TS))  # completes or gets a RST
            out.append(tcp(src, A4, 5555, port, 1001, 1, ACK, b"data" * 40, options=TS))  # fast-path shape
            out.append(tcp(src, A4, 5555, port, 1001, 1, ACK | FIN, options=TS))
            out.append(tcp(src, A4, 5555, port, 1001, 1, RST))
            out.append(tcp(src, A4, 5555, port, 1000, 0, SYN | ACK))  # not a bare SYN: first rule
        for port in (53, 54):
            out.append(udp(src, A4, 4000, port, b"query"))
        out.append(echo_request(src, A4, 7, 1, b"ping"))
        out.append(tcp(src, OTHER4, 5555, 80, 1000, 0, SYN))  # not to us
        out.append(ipv4(src, A4, 6, tcp(src, A4, 5555, 80, 1000, 0, SYN)[20:40], frag=0x2000))  # a fragment
    out.append(tcp(B6, A6, 5555, 80, 1000, 0, SYN, options=MSS))
    out.append(tcp(B6, A6, 5555, 81, 1000, 0, SYN, options=MSS))
    out.append(udp(B6, A6, 4000, 53, b"v6"))
    out += [b"", b"\x45", b"\x45" + bytes(39), b"\x60" + bytes(50), bytes(range(60))]
    return out


POOL = pool()


def outcome(s: Stack, f: FilterState, rejects: list[bytes]) -> tuple:
    sent = s.packets_to_send()
    counters = asdict(s.counters)
    return (sent, counters, f.accepted, f.dropped, dict(f.drops), rejects, len(s.connections),
            sorted((c.state, c.rcv_nxt) for c in s.connections.values()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, len(POOL) - 1), max_size=30), min_size=1, max_size=4))
def test_fused_filter_matches_filter_then_stack(batches: list[list[int]]) -> None:
    fused, split = make_stack(), make_stack()
    ff, fs = make_filter(), make_filter()
    for i, batch in enumerate(batches):
        packets = [POOL[k] for k in batch]
        now = 0.01 * (i + 1)
        fused.receive_packets(packets, now, ff)
        accepted, rejects = fs.filter_inbound(packets)
        split.receive_packets(accepted, now)
        assert outcome(fused, ff, ff.take_rejects()) == outcome(split, fs, rejects)


def test_denied_syn_gets_a_reject_and_never_reaches_the_stack() -> None:
    s, f = make_stack(), make_filter()
    s.receive_packets([tcp(OTHER4, A4, 5555, 80, 1000, 0, SYN, options=MSS)], 0.0, f)
    assert s.packets_to_send() == []  # no SYN-ACK: the stack never saw it
    assert s.counters.packets_received == 0 and not s.connections
    (reject,) = f.take_rejects()
    assert reject[9] == 99  # TSMP
    assert f.dropped == 1 and f.take_rejects() == []
    # The peer with rights gets its SYN-ACK.
    s.receive_packets([tcp(B4, A4, 5555, 80, 1000, 0, SYN, options=MSS)], 0.0, f)
    (synack,) = s.packets_to_send()
    assert synack[33] == SYN | ACK and f.accepted == 1
