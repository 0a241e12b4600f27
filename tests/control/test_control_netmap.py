"""Sans-IO client map session: framing, keep-alives, full and delta application, snapshots."""

import datetime as dt
import ipaddress
import json
import struct

import pytest
import zstandard

from tsnet.control import tailcfg as tc
from tsnet.control.netmap import MapFrameDecoder, MapSession, MapSessionError
from tsnet.key import DiscoPrivate, NodePrivate

NOW = dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
K = [NodePrivate.generate().public for _ in range(5)]
D = [DiscoPrivate.generate().public for _ in range(5)]


def node(i, **kw):
    return tc.Node(id=i, stable_id=f"n{i}", name=f"n{i}.tn.test.", user=1, key=K[i], disco_key=D[i],
                   addresses=(f"100.64.0.{i}/32",), home_derp=900, cap=133, online=True, **kw)


def frame(obj, compress=True):
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    if compress:
        body = zstandard.ZstdCompressor().compress(body)
    return struct.pack("<I", len(body)) + body


def first():
    return tc.MapResponse(node=node(0), peers=(node(1), node(2)),
                          packet_filter=(tc.FilterRule(src_ips=("*",)),), domain="tn.test",
                          derp_map=tc.DERPMap(regions={900: tc.DERPRegion(region_id=900, region_code="x")}),
                          user_profiles=(tc.UserProfile(id=1, login_name="u@x"),))


def test_decoder_split_frames_and_keepalive_cache():
    dec = MapFrameDecoder()
    wire = frame(tc.encode(first())) + frame(b'{"KeepAlive":true}') + frame(b'{"KeepAlive":true}')
    msgs = []
    for i in range(0, len(wire), 7):
        msgs += dec.feed(wire[i:i + 7])
    assert [m.keep_alive for m in msgs] == [None, True, True]
    assert msgs[0].peers[1].key == K[2]
    with pytest.raises(MapSessionError):
        MapFrameDecoder().feed(frame(b"{}", compress=False))  # 1.96 always zstd: plain JSON is an error
    with pytest.raises(MapSessionError):
        MapFrameDecoder().feed(struct.pack("<I", 1 << 30))


def test_first_message_needs_node():
    s = MapSession()
    assert s.apply(tc.MapResponse(keep_alive=True), NOW) is None
    with pytest.raises(MapSessionError, match="lacked node"):
        s.apply(tc.MapResponse(peers=(node(1),)), NOW)


def test_full_then_deltas():
    s = MapSession()
    nm = s.apply(first(), NOW)
    assert [p.id for p in nm.peers] == [1, 2] and nm.domain == "tn.test"
    assert nm.peers[0].addresses == (ipaddress.ip_interface("100.64.0.1/32"),)
    assert nm.peers[0].allowed_ips == (ipaddress.ip_network("100.64.0.1/32"),)  # AllowedIPs absent = Addresses
    before = nm
    # An empty Peers list is "no change", PeersRemoved drops, PeersChanged adds/replaces.
    nm = s.apply(tc.MapResponse(peers=(), peers_removed=(1,), peers_changed=(node(3), node(2, endpoints=("1.2.3.4:5",)))), NOW)
    assert [p.id for p in nm.peers] == [2, 3]
    assert nm.peers[0].endpoints == ((ipaddress.ip_address("1.2.3.4"), 5),)
    assert [p.id for p in before.peers] == [1, 2]  # snapshots are immutable
    # Patches, online and seen changes; unknown IDs ignored.
    nm = s.apply(tc.MapResponse(
        online_change={2: False, 99: True}, peer_seen_change={3: True},
        peers_changed_patch=(tc.PeerChange(node_id=3, derp_region=901, endpoints=("[2001:db8::1]:41641",),
                                           disco_key=D[4], cap=140), tc.PeerChange(node_id=77, cap=1))), NOW)
    p2, p3 = nm.peers
    assert p2.online is False and p3.last_seen == NOW
    assert p3.home_derp == 901 and p3.cap == 140 and p3.disco_key == D[4]
    assert p3.endpoints == ((ipaddress.ip_address("2001:db8::1"), 41641),)
    # A full Peers list replaces everything.
    nm = s.apply(tc.MapResponse(peers=(node(4),)), NOW)
    assert [p.id for p in nm.peers] == [4]


def test_filters_dns_derp_and_profiles():
    s = MapSession()
    s.apply(first(), NOW)
    nm = s.apply(tc.MapResponse(packet_filter=()), NOW)
    assert nm.packet_filter == ()  # [] = deny all
    nm = s.apply(tc.MapResponse(packet_filters={"b": (tc.FilterRule(src_ips=("b",)),), "a": (tc.FilterRule(src_ips=("a",)),)}), NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("a",), ("b",)]  # concatenated in name order: a, b, base (empty)
    nm = s.apply(tc.MapResponse(packet_filters={"*": None}), NOW)
    assert nm.packet_filter == ()
    nm = s.apply(tc.MapResponse(derp_map=tc.DERPMap(home_params=tc.DERPHomeParams(region_score={900: 0.5}))), NOW)
    assert 900 in nm.derp_map.regions and nm.derp_map.home_params.region_score == {900: 0.5}
    nm = s.apply(tc.MapResponse(user_profiles=(tc.UserProfile(id=2, login_name="v@x"),),
                                dns_config=tc.DNSConfig(domains=("tn.test",))), NOW)
    assert set(nm.user_profiles) == {1, 2} and nm.dns_config.domains == ("tn.test",)
    nm = s.apply(tc.MapResponse(node=node(0, cap_map={"magicdns-aaaa": None})), NOW)
    assert "magicdns-aaaa" in nm.cap_map and nm.name == "n0.tn.test."


def test_peer_without_key_is_skipped_and_legacy_derp():
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=(tc.Node(id=5, name="x"),
                                                     tc.Node(id=6, key=K[1], legacy_derp_string="127.3.3.40:7"))), NOW)
    assert [p.id for p in nm.peers] == [6] and nm.peers[0].home_derp == 7 and nm.peers[0].disco_key is None
