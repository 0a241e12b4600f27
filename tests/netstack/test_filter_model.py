"""The fast packet filter agrees with a slow, obvious model of §B.4 on random rules and packets.

The model works on ``ipaddress`` objects and parsed fields, so it shares nothing with the
filter's byte-offset fast paths (flow keys, local-host sets, integer ranges).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.control import tailcfg
from tsnet.netstack.filter import FilterState, PacketFilter
from tsnet.netstack.ip import ipv4_header, ipv6_header

V4_POOL = ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.200", "10.0.0.5", "224.0.0.9", "169.254.3.3"]
V6_POOL = ["fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::3", "fd00::5", "ff02::1", "fe80::7"]
SRC_FORMS_V4 = ["*", "100.64.0.2", "100.64.0.0/30", "100.64.0.2-100.64.0.3", "10.0.0.0/8", "cap:c1", "cap:c2"]
SRC_FORMS_V6 = ["fd7a:115c:a1e0::2", "fd7a:115c:a1e0::/126", "fd7a:115c:a1e0::2-fd7a:115c:a1e0::9", "fd00::/8"]
DST_FORMS = ["*", "100.64.0.1", "100.64.0.0/24", "10.0.0.0/24", "fd7a:115c:a1e0::1", "fd00::/64",
             "100.64.0.1-100.64.0.2"]
PROTOS = [6, 17, 1, 58, 132, 47, 99]
LOCAL = ["100.64.0.1", "fd7a:115c:a1e0::1", "10.0.0.0/24", "fd00::/64"]
CAPS = {"100.64.0.2": {"c1"}, "fd7a:115c:a1e0::3": {"c2"}, "100.64.0.3": {"c2", "c3"}}


@dataclass(frozen=True)
class Pkt:
    version: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    flags: int  # TCP flags, or ICMP type
    pad: int = 0  # payload bytes (big packets take the filter's fast path, small ones do not)

    def encode(self) -> bytes:
        if self.proto == 6:
            body = struct.pack("!HHIIBBHHH", self.sport, self.dport, 1, 2, 0x50, self.flags, 1000, 0, 0)
        elif self.proto in (17, 132):
            body = struct.pack("!HHHH", self.sport, self.dport, 8, 0) + bytes(4)
        elif self.proto in (1, 58):
            body = bytes((self.flags, 0, 0, 0)) + bytes(8)
        else:
            body = b"p" + bytes(10)
        body += bytes(self.pad)
        s, d = ipaddress.ip_address(self.src).packed, ipaddress.ip_address(self.dst).packed
        if self.version == 4:
            return ipv4_header(s, d, self.proto, len(body)) + body
        return ipv6_header(s, d, self.proto, len(body)) + body


def _ranges(text: str, version: int) -> list[tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]]:
    if text == "*":
        net = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
        return [(net[0], net[-1])]
    if "-" in text:
        a, b = (ipaddress.ip_address(x) for x in text.split("-"))
        return [(a, b)] if a.version == version else []
    net = ipaddress.ip_network(text)
    return [(net[0], net[-1])] if net.version == version else []


def _inside(addr: str, text: str) -> bool:
    a = ipaddress.ip_address(addr)
    return any(lo <= a <= hi for lo, hi in _ranges(text, a.version))


def model(rules: list[tailcfg.FilterRule], flows: set[tuple], p: Pkt) -> bool:
    """§B.4 written the slow, obvious way."""
    dst = ipaddress.ip_address(p.dst)
    if dst.is_multicast:
        return False
    if dst.version == 4 and dst in ipaddress.ip_network("169.254.0.0/16") and p.dst != "169.254.169.254":
        return False
    if dst.version == 6 and dst in ipaddress.ip_network("fe80::/10"):
        return False
    if not any(_inside(p.dst, local) for local in LOCAL):
        return False

    def src_ok(r: tailcfg.FilterRule, with_caps: bool = True) -> bool:
        for s in r.src_ips or ():
            if s.startswith("cap:"):
                if with_caps and s[4:] in CAPS.get(p.src, set()):
                    return True
            elif _inside(p.src, s):
                return True
        return False

    def protos(r: tailcfg.FilterRule) -> set[int]:
        return set(r.ip_proto) if r.ip_proto else {6, 17, 1, 58}

    def port_rule() -> bool:
        return any(p.proto in protos(r) and src_ok(r) and any(
            _inside(p.dst, d.ip) and d.ports.first <= p.dport <= d.ports.last for d in r.dst_ports) for r in rules)

    if p.proto in (1, 58):
        reply = 0 if p.proto == 1 else 129
        errors = {3, 11, 12} if p.proto == 1 else {1, 2, 3, 4}
        if p.flags == reply or p.flags in errors:
            return True
        return any(src_ok(r) and any(_inside(p.dst, d.ip) for d in r.dst_ports) for r in rules)
    if p.proto == 6:
        if p.flags & 0x12 != 0x02:
            return True
        return port_rule()
    if p.proto in (17, 132):
        if (p.proto, p.src, p.sport, p.dst, p.dport) in flows:
            return True
        return port_rule()
    if p.proto == 99:
        return True
    return any(p.proto in protos(r) and src_ok(r, with_caps=False) and any(
        _inside(p.dst, d.ip) and (d.ports.first, d.ports.last) == (0, 65535) for d in r.dst_ports) for r in rules)


def _rule() -> st.SearchStrategy[tailcfg.FilterRule]:
    ports = st.sampled_from([(0, 65535), (22, 22), (80, 90), (0, 0), (443, 443)])
    dst = st.builds(lambda ip, pr: tailcfg.NetPortRange(ip=ip, ports=tailcfg.PortRange(first=pr[0], last=pr[1])),
                    st.sampled_from(DST_FORMS), ports)
    return st.builds(
        lambda srcs, dsts, protos: tailcfg.FilterRule(src_ips=tuple(srcs), dst_ports=tuple(dsts),
                                                      ip_proto=tuple(protos) or None),
        st.lists(st.sampled_from(SRC_FORMS_V4 + SRC_FORMS_V6), min_size=1, max_size=3),
        st.lists(dst, min_size=1, max_size=3),
        st.lists(st.sampled_from(PROTOS), max_size=2),
    )


def _packet() -> st.SearchStrategy[Pkt]:
    def build(version: int, proto: int, src_i: int, dst_i: int, to_me: bool, sport: int, dport: int, flags: int,
              pad: int) -> Pkt:
        pool = V4_POOL if version == 4 else V6_POOL
        if proto in (1, 58):
            proto = 1 if version == 4 else 58
        dst = pool[0] if to_me else pool[dst_i % len(pool)]  # half the packets are for our own address
        return Pkt(version, proto, pool[src_i % len(pool)], dst, sport, dport, flags, pad)

    return st.builds(build, st.sampled_from([4, 6]), st.sampled_from(PROTOS), st.integers(0, 20), st.integers(0, 20),
                     st.booleans(), st.sampled_from([22, 53, 85, 443, 40000]),
                     st.sampled_from([0, 22, 53, 85, 443, 40000]),
                     st.sampled_from([0x02, 0x12, 0x10, 0x03, 0x00, 8, 128, 0, 129, 3, 11, 2, 13]),
                     st.sampled_from([0, 30, 1200]))


@settings(max_examples=500, deadline=None)
@given(rules=st.lists(_rule(), max_size=4), outbound=st.lists(_packet(), max_size=4),
       packets=st.lists(_packet(), min_size=1, max_size=8))
def test_filter_agrees_with_model(rules: list[tailcfg.FilterRule], outbound: list[Pkt], packets: list[Pkt]) -> None:
    state = FilterState(PacketFilter.from_rules(rules, LOCAL, peer_caps=CAPS))
    flows: set[tuple] = set()
    for out in outbound:
        if state.note_outbound(out.encode()).accepted and out.proto in (17, 132):
            flows.add((out.proto, out.dst, out.dport, out.src, out.sport))  # as the reply carries it
    for pkt in packets:
        got = state.check_inbound(pkt.encode())
        assert got.accepted is model(rules, flows, pkt), (pkt, got.reason)
