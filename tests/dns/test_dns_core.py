"""The sans-IO MagicDNS core: answers, refusals, routing and truncation."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from dnstest_helpers import make_config
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.dns import wire
from tsnet.dns.config import DNSConfig, DNSConfigError
from tsnet.dns.core import Answer, Drop, Forward, MagicDNS



# One resolver for the property tests: building it per example costs more than the query itself.
_SHARED = MagicDNS(make_config())


def ask(magic: MagicDNS, name: str, qtype: str = "A", transport: str = "udp", edns: int | None = None) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    if edns is not None:
        query.add_ar(EDNS0(udp_len=edns))
    result = magic.handle_query(query.pack(), transport)  # type: ignore[arg-type]
    assert isinstance(result, Answer), result
    reply = DNSRecord.parse(result.response)
    assert reply.header.id == query.header.id and reply.header.qr == 1
    return reply


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


@pytest.mark.parametrize("name", ["alpha.tailnet.test", "alpha.tailnet.test.", "alpha", "ALPHA.TailNet.Test"])
def test_a_and_aaaa_for_short_and_full_names(magic: MagicDNS, name: str) -> None:
    reply = ask(magic, name, "A")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert addresses(reply) == ["100.64.0.1"]
    assert reply.rr[0].ttl == 600
    # The answer echoes the question name exactly as asked (0x20 case randomisation keeps working).
    assert str(reply.rr[0].rname).rstrip(".") == name.rstrip(".")
    assert addresses(ask(magic, name, "AAAA")) == ["fd7a:115c:a1e0::1"]


def test_any_returns_both_families(magic: MagicDNS) -> None:
    assert sorted(addresses(ask(magic, "alpha", "ANY"))) == ["100.64.0.1", "fd7a:115c:a1e0::1"]


@pytest.mark.parametrize(("name", "qtype"), [("beta", "AAAA"), ("gamma", "A"), ("alpha", "TXT"), ("alpha", "MX")])
def test_existing_name_without_that_type_is_noerror_empty(magic: MagicDNS, name: str, qtype: str) -> None:
    reply = ask(magic, name, qtype)
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []


@pytest.mark.parametrize("qtype", ["NS", "SOA"])
def test_zone_types_are_not_implemented(magic: MagicDNS, qtype: str) -> None:
    assert ask(magic, "alpha.tailnet.test", qtype).header.rcode == RCODE.NOTIMP


def test_extra_records_answer(magic: MagicDNS) -> None:
    assert addresses(ask(magic, "db.tailnet.test")) == ["100.64.0.9"]


@pytest.mark.parametrize(
    "name", ["nope.tailnet.test", "a.b.tailnet.test", "tailnet.test", "x.local.example", "x.onion"]
)
def test_unknown_names_in_our_zones_are_nxdomain(magic: MagicDNS, name: str) -> None:
    reply = ask(magic, name)
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.header.aa == 1
    assert magic.lookup(name).status == "nxdomain"


def test_ptr_for_tailnet_addresses(magic: MagicDNS) -> None:
    v4 = ipaddress.ip_address("100.64.0.2").reverse_pointer
    assert addresses(ask(magic, v4, "PTR")) == ["beta.tailnet.test."]
    v6 = ipaddress.ip_address("fd7a:115c:a1e0::1").reverse_pointer
    assert addresses(ask(magic, v6, "PTR")) == ["alpha.tailnet.test."]
    quad100 = ipaddress.ip_address("100.100.100.100").reverse_pointer
    assert addresses(ask(magic, quad100, "PTR")) == ["magicdns.localhost-tailscale-daemon."]
    assert addresses(ask(magic, "magicdns.localhost-tailscale-daemon", "A")) == ["100.100.100.100"]


def test_ptr_unknown_tailnet_address_is_nxdomain_other_ranges_forwarded(magic: MagicDNS) -> None:
    unknown = ipaddress.ip_address("100.127.255.1").reverse_pointer
    assert ask(magic, unknown, "PTR").header.rcode == RCODE.NXDOMAIN
    unknown6 = ipaddress.ip_address("fd7a:115c:a1e0::ff").reverse_pointer
    assert ask(magic, unknown6, "PTR").header.rcode == RCODE.NXDOMAIN
    outside = DNSRecord.question(ipaddress.ip_address("192.0.2.1").reverse_pointer, "PTR").pack()
    assert isinstance(magic.handle_query(outside), Forward)


def test_routes_longest_suffix_and_default(magic: MagicDNS) -> None:
    query = DNSRecord.question("host.corp.example").pack()
    result = magic.handle_query(query)
    assert result == Forward(("127.0.0.1:5399",), query, 512)
    other = DNSRecord.question("example.com").pack()
    result = magic.handle_query(other, "tcp")
    assert result == Forward(("127.0.0.1:5398",), other, wire.MAX_TCP_MESSAGE)
    assert magic.lookup("example.com").status == "not_ours"
    # A more specific local route beats a forwarding parent route.
    magic.set_config(make_config(routes={"example": ["127.0.0.1:1"], "in.example": []}))
    assert ask(magic, "x.in.example").header.rcode == RCODE.NXDOMAIN
    assert isinstance(magic.handle_query(DNSRecord.question("x.out.example").pack()), Forward)


def test_no_upstream_is_servfail() -> None:
    magic = MagicDNS(make_config(default_resolvers=[]))
    assert ask(magic, "example.com").header.rcode == RCODE.SERVFAIL
    # Tailnet names still work without any upstream.
    assert addresses(ask(magic, "alpha")) == ["100.64.0.1"]


def test_udp_truncation_without_edns_and_full_answer_with_edns_or_tcp() -> None:
    many = [f"fd7a:115c:a1e0::{i:x}" for i in range(1, 41)]  # 40 AAAA records, ~1.2 kB
    magic = MagicDNS(make_config(hosts={"big": many}))
    small = ask(magic, "big.tailnet.test", "AAAA")
    assert small.header.tc == 1 and 0 < len(small.rr) < 40
    assert len(small.pack()) <= 512
    big = ask(magic, "big.tailnet.test", "AAAA", edns=4096)
    assert big.header.tc == 0 and len(big.rr) == 40
    assert [rr.rtype for rr in big.ar] == [QTYPE.OPT]
    tiny_edns = ask(magic, "big.tailnet.test", "AAAA", edns=100)  # below 512 counts as 512
    assert tiny_edns.header.tc == 1 and len(tiny_edns.pack()) <= 512
    tcp = ask(magic, "big.tailnet.test", "AAAA", transport="tcp")
    assert tcp.header.tc == 0 and len(tcp.rr) == 40


def test_forward_finish_truncates_oversized_upstream_reply() -> None:
    query = DNSRecord.question("example.com", "TXT")
    reply = query.reply()
    for i in range(20):
        reply.add_answer(*DNSRecord.question("example.com").replyZone(f'example.com 60 TXT "{"x" * 60}{i}"').rr)
    packed = reply.pack()
    assert len(packed) > 512
    forward = Forward(("127.0.0.1",), query.pack(), 512)
    cut = DNSRecord.parse(forward.finish(packed))
    assert cut.header.tc == 1 and cut.rr == [] and str(cut.q.qname) == "example.com."
    assert forward.finish(packed[:100]) == packed[:100]
    assert Forward(("x",), query.pack(), 4095).finish(packed) == packed
    fail = DNSRecord.parse(forward.servfail())
    assert fail.header.rcode == RCODE.SERVFAIL and fail.header.id == query.header.id


def _header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, 0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x34",  # header cut short
        b"\x12\x34\x01\x00garbage!",
        _header() + b"\x07example",  # question runs off the end
        _header(qd=0),
        _header(qd=2) + b"\x01a\x00\x00\x01\x00\x01\x01b\x00\x00\x01\x00\x01",
        _header(an=1) + b"\x01a\x00\x00\x01\x00\x01",  # claims an answer it does not carry
        _header() + b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer loop
    ],
)
def test_malformed_queries_get_formerr(magic: MagicDNS, data: bytes) -> None:
    result = magic.handle_query(data)
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_FORMERR
    header = struct.unpack("!6H", result.response[:12])
    assert header[0] == 0x1234 and header[1] & 0x800F == 0x8001
    assert magic.stats["formerr"] >= 1


def test_tiny_packets_and_responses_are_dropped(magic: MagicDNS) -> None:
    assert isinstance(magic.handle_query(b""), Drop)
    assert isinstance(magic.handle_query(b"\x01"), Drop)
    response = DNSRecord.question("alpha").reply().pack()
    assert isinstance(magic.handle_query(response), Drop)


def test_non_query_opcode_and_class_are_notimp(magic: MagicDNS) -> None:
    notify = bytearray(DNSRecord.question("alpha").pack())
    notify[2] |= 4 << 3
    result = magic.handle_query(bytes(notify))
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_NOTIMP
    chaos = DNSRecord.question("version.bind", "TXT", "CH").pack()
    result = magic.handle_query(chaos)
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_NOTIMP


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    magic = _SHARED
    result = magic.handle_query(data)
    assert isinstance(result, Answer | Forward | Drop)
    if isinstance(result, Answer):
        assert result.response[:2] == data[:2] and result.response[2] & 0x80


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_queries_never_raise(data: st.DataObject) -> None:
    magic = _SHARED
    name = data.draw(st.sampled_from(["alpha", "x.corp.example", "b.tailnet.test"]))
    query = bytearray(DNSRecord.question(name).pack())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(query) - 1))
        query[pos] = data.draw(st.integers(0, 255))
    query = query[: data.draw(st.integers(0, len(query)))]
    assert isinstance(magic.handle_query(bytes(query)), Answer | Forward | Drop)


def test_tcp_frame_decoder_splits_and_joins() -> None:
    a, b = b"\x01" * 20, b"\x02" * 300
    stream = wire.frame(a) + wire.frame(b)
    decoder = wire.TCPFrameDecoder()
    out = []
    for i in range(0, len(stream), 7):
        out += decoder.feed(stream[i : i + 7])
    assert out == [a, b] and decoder.pending == 0
    assert wire.TCPFrameDecoder().feed(stream) == [a, b]
    with pytest.raises(ValueError):
        wire.TCPFrameDecoder().feed(b"\x00\x00")
    with pytest.raises(ValueError):
        wire.frame(b"x" * 70000)


def test_config_validation() -> None:
    with pytest.raises(DNSConfigError):
        DNSConfig.build(hosts={"bad..name": ["100.64.0.1"]})
    with pytest.raises(DNSConfigError):
        DNSConfig.build(hosts={"a": ["not-an-ip"]})
    with pytest.raises(DNSConfigError):
        DNSConfig.build(hosts={"a": ["100.64.0.0/24"]})
    with pytest.raises(DNSConfigError):
        DNSConfig.build(extra_records=[("a.b", "AAAA", "100.64.0.1")])
    with pytest.raises(DNSConfigError):
        DNSConfig.build(extra_records=[("a.b", "CNAME", "100.64.0.1")])


def test_from_control_json() -> None:
    dns_json = {
        "Resolvers": [{"Addr": "127.0.0.1:5398"}],
        "Routes": {"tn.test.": [], "corp.example.": [{"Addr": "127.0.0.1:5399"}]},
        "ExtraRecords": [{"Name": "svc.tn.test", "Type": "", "Value": "100.64.0.50"}],
    }
    nodes = {"alpha.tn.test.": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "beta.tn.test.": ["100.64.0.2/32"]}
    config = DNSConfig.from_control(dns_json, nodes)
    assert config.base_domain == "tn.test"
    assert config.default_resolvers == ("127.0.0.1:5398",)
    magic = MagicDNS(config)
    assert addresses(ask(magic, "beta")) == ["100.64.0.2"]
    assert addresses(ask(magic, "svc.tn.test")) == ["100.64.0.50"]
    assert ask(magic, "zzz.tn.test").header.rcode == RCODE.NXDOMAIN
    assert isinstance(magic.handle_query(DNSRecord.question("h.corp.example").pack()), Forward)
    # Without routes the suffix is inferred from the node names.
    assert DNSConfig.from_control(None, nodes).base_domain == "tn.test"
    # Without the magicdns-aaaa attribute, node names get no AAAA answers (NOERROR, empty).
    v4_only = MagicDNS(DNSConfig.from_control(dns_json, nodes, ipv6_answers=False))
    reply = ask(v4_only, "alpha", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    assert addresses(ask(v4_only, "alpha", "A")) == ["100.64.0.1"]


def test_additional_records_edns_and_pointers(magic: MagicDNS) -> None:
    base = DNSRecord.question("alpha.tailnet.test").pack()
    header = bytearray(base[:12])
    # One extra (non-OPT) additional record whose owner is a backward pointer to the question name.
    header[11] = 1
    extra = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0, 3) + b"\x02hi"
    result = magic.handle_query(bytes(header) + base[12:] + extra)
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_NOERROR
    assert addresses(DNSRecord.parse(result.response)) == ["100.64.0.1"]
    # Two OPT records are a format error (RFC 6891 §6.1.1).
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    header[11] = 2
    result = magic.handle_query(bytes(header) + base[12:] + opt + opt)
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_FORMERR
    # A pointer that points forwards (or at itself) is refused rather than followed.
    header[11] = 1
    result = magic.handle_query(bytes(header) + base[12:] + b"\xc0\x40" + opt[1:])
    assert isinstance(result, Answer) and result.rcode == wire.RCODE_FORMERR
    # NXDOMAIN answers to EDNS queries carry our OPT record too.
    reply = ask(magic, "nope.tailnet.test", edns=1232)
    assert reply.header.rcode == RCODE.NXDOMAIN and [rr.rtype for rr in reply.ar] == [QTYPE.OPT]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["alpha", "beta.tailnet.test", "gamma", "db.tailnet.test", "nope.tailnet.test", "x.onion"]),
    st.lists(st.booleans(), min_size=30, max_size=30),
    st.sampled_from(["A", "AAAA", "ANY", "TXT", "MX", "PTR", "CNAME", "SRV"]),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.sampled_from(["udp", "tcp"]),
)
def test_answers_always_parse_and_echo_the_question(
    name: str, upper: list[bool], qtype: str, edns: int | None, transport: str
) -> None:
    magic = _SHARED
    mixed = "".join(c.upper() if u else c for c, u in zip(name, upper + [False] * len(name)))
    query = DNSRecord.question(mixed, qtype)
    if edns is not None:
        query.add_ar(EDNS0(udp_len=edns))
    result = magic.handle_query(query.pack(), transport)  # type: ignore[arg-type]
    assert isinstance(result, Answer)
    reply = DNSRecord.parse(result.response)
    assert reply.header.id == query.header.id and reply.header.qr == 1 and reply.header.aa == 1
    assert reply.questions == query.questions and str(reply.q.qname) == str(query.q.qname)
    assert all(str(rr.rname) == str(query.q.qname) for rr in reply.rr)
    assert (len(reply.ar) == 1) == (edns is not None)
