import datetime as dt
import json

import pytest
from hypothesis import given, settings, strategies as st

from tsnet.control import tailcfg as tc
from tsnet.control.jsoncodec import format_time, parse_time
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate

NK = str(NodePrivate.generate().public)
MK = str(MachinePrivate.generate().public)
DK = str(DiscoPrivate.generate().public)

FIRST = {
    "Node": {"ID": 1, "StableID": "n1", "Name": "alpha.tn.test.", "User": 1, "Key": NK, "Machine": MK,
             "DiscoKey": DK, "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
             "AllowedIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "HomeDERP": 900, "Cap": 133,
             "MachineAuthorized": True, "CapMap": {"disable-captive-portal-detection": None}},
    "DERPMap": {"Regions": {"900": {"RegionID": 900, "RegionCode": "test", "RegionName": "Test",
                "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                           "IPv6": "none", "DERPPort": 4443, "STUNPort": -1, "InsecureForTests": True}]}}},
    "Peers": [{"ID": 2, "StableID": "n2", "Name": "beta.tn.test.", "User": 1, "Key": NK, "Machine": MK,
               "DiscoKey": DK, "Addresses": ["100.64.0.2/32"], "AllowedIPs": ["100.64.0.2/32"],
               "Endpoints": ["192.0.2.10:41641"], "HomeDERP": 900, "Cap": 133, "Online": True,
               "MachineAuthorized": True, "Hostinfo": {"Hostname": "beta", "SomeFutureField": [1, 2]}}],
    "PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}],
    "UserProfiles": [{"ID": 1, "LoginName": "test@tn.test", "DisplayName": "Test"}],
    "Domain": "tn.test", "CollectServices": False, "ControlTime": "2026-05-01T12:00:00Z",
    "OnlineChange": {"2": False},
}


def test_first_message_round_trips_exactly():
    resp = tc.decode(tc.MapResponse, json.dumps(FIRST))
    assert resp.node.key.hex() == NK[len("nodekey:"):]
    assert resp.derp_map.regions[900].nodes[0].stun_port == -1
    assert resp.peers[0].hostinfo.hostname == "beta"
    assert resp.online_change == {2: False}
    assert resp.control_time == dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert tc.encode(resp) == FIRST  # unknown Hostinfo members survive


def test_empty_list_kept_none_omitted():
    assert tc.encode(tc.MapResponse(packet_filter=())) == {"PacketFilter": []}
    assert tc.encode(tc.MapResponse()) == {}
    assert tc.dumps(tc.MapResponse(keep_alive=True)) == b'{"KeepAlive":true}'


def test_case_insensitive_and_unknown_fields():
    req = tc.decode(tc.MapRequest, b'{"version":133,"NODEKEY":"%s","Whatever":1,"Stream":true}' % NK.encode())
    assert req.version == 133 and req.stream is True and str(req.node_key) == NK


def test_key_response_names():
    r = tc.OverTLSPublicKeyResponse(legacy_public_key=MachinePrivate.generate().public, public_key=None)
    assert set(tc.encode(r)) == {"legacyPublicKey"}


@pytest.mark.parametrize("bad", [
    b'{"NodeKey": ""}', b'{"NodeKey": "mkey:00"}', b'{"Version": "x"}', b"[1]", b"{", b'{"Expiry":"2020-01-01T00:00:00"}',
])
def test_bad_input_raises_decode_error(bad):
    with pytest.raises(tc.DecodeError):
        tc.decode(tc.RegisterRequest, bad)


def test_time_formats():
    assert parse_time("2026-05-01T12:00:00.123456789Z") == dt.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    assert parse_time("2026-05-01T14:00:00+02:00") == dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert format_time(tc.LOGOUT_EXPIRY) == "1970-01-01T00:02:03Z"
    assert format_time(dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc)) == "0001-01-01T00:00:00Z"


def test_register_request_from_tailscaled_shape():
    body = {"Version": 133, "NodeKey": NK, "OldNodeKey": "nodekey:" + "0" * 64, "NLKey": "nlpub:" + "0" * 64,
            "Auth": {"AuthKey": "tskey-x"}, "Expiry": "0001-01-01T00:00:00Z", "Followup": "",
            "Hostinfo": {"IPNVersion": "1.96.4", "BackendLogID": "abc", "OS": "linux", "Hostname": "h",
                         "NetInfo": {"PreferredDERP": 900, "DERPLatency": {"900-v4": 0.001}, "HavePortMap": False}},
            "Ephemeral": False, "NodeKeySignature": None}
    req = tc.decode(tc.RegisterRequest, json.dumps(body))
    assert req.old_node_key.is_zero() and req.auth.auth_key == "tskey-x"
    assert req.hostinfo.net_info.preferred_derp == 900
    out = tc.encode(req)
    body.pop("NodeKeySignature")
    assert out == body


names = st.text(alphabet="abcdefgh", max_size=5)


@settings(max_examples=100, deadline=None)
@given(st.builds(
    tc.Node,
    id=st.integers(1, 2**53), name=names, addresses=st.lists(names).map(tuple), online=st.booleans() | st.none(),
    cap_map=st.dictionaries(names, st.none() | st.lists(st.integers()), max_size=3) | st.none(),
    key_expiry=st.datetimes(timezones=st.just(dt.timezone.utc)) | st.none(),
))
def test_node_round_trip_property(node):
    assert tc.decode(tc.Node, tc.dumps(node)) == node


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _fields_of(cls):
    import dataclasses

    return [f.metadata["json"] for f in dataclasses.fields(cls) if "json" in f.metadata]


@pytest.mark.parametrize("cls", [tc.RegisterRequest, tc.MapRequest, tc.MapResponse, tc.Node, tc.Hostinfo])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_arbitrary_json_decodes_or_raises_decode_error(cls, data):
    names = _fields_of(cls)
    obj = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=6), json_values, max_size=6))
    try:
        tc.decode(cls, json.dumps(obj))
    except tc.DecodeError:
        pass
