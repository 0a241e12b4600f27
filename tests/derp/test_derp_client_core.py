"""Client-side sans-IO protocol, node dialing rules and backoff."""

import pytest

from tsnet.derp import frames as f
from tsnet.derp.client import Backoff, DerpNode, client_ssl_context
from tsnet.derp.client_core import (
    ClientState,
    DerpClientProtocol,
    HealthChanged,
    KeepAliveReceived,
    PingTimeout,
    PongReceived,
    ReceivedPacket,
    ServerInfoReceived,
)
from tsnet.derp.info import ClientInfo, ServerInfo, open_from, seal_to
from tsnet.key import NodePrivate

SERVER = NodePrivate.generate()


def connected(now=0.0, server_info=ServerInfo(), **kw):
    key = NodePrivate.generate()
    proto = DerpClientProtocol(key, now, **kw)
    proto.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), now)
    hello = proto.data_to_send()
    sealed = seal_to(SERVER.raw, key.public.raw, server_info.to_json())
    events = proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), now)
    assert isinstance(events[0], ServerInfoReceived) and proto.state is ClientState.CONNECTED
    return proto, key, hello


def test_client_info_is_what_tailscaled_sends_and_note_preferred_follows():
    proto, key, hello = connected(preferred=True)
    assert hello[0] == 0x02 and int.from_bytes(hello[1:5], "big") == 104
    assert hello[5:37] == key.public.raw
    assert open_from(SERVER.raw, key.public.raw, hello[37:109]) == ClientInfo().to_json()
    assert hello[109:] == b"\x07\x00\x00\x00\x01\x01"


def test_receive_packets_pings_and_unknown_frames():
    proto, _, _ = connected()
    src = NodePrivate.generate().public
    wire = (
        f.encode_frame(f.RecvPacket(src.raw, b"wg"))
        + f.encode_frame(f.UnknownFrame(0x0E, b"skip me"))
        + f.encode_frame(f.KeepAlive())
        + f.encode_frame(f.Ping(b"pingdata"))
        + f.encode_frame(f.Health("degraded"))
        + bytes.fromhex("050000000a") + bytes(10)  # RecvPacket shorter than a key: dropped
    )
    events = proto.receive_data(wire, 1.0)
    assert events == [ReceivedPacket(src, b"wg"), KeepAliveReceived(), HealthChanged("degraded")]
    assert proto.data_to_send() == f.encode_frame(f.Pong(b"pingdata"))


def test_ping_pong_and_timeout():
    proto, _, _ = connected()
    data = proto.send_ping(0.0, timeout=3.0)
    assert proto.data_to_send() == f.encode_frame(f.Ping(data))
    assert proto.receive_data(f.encode_frame(f.Pong(data)), 1.0) == [PongReceived(data)]
    lost = proto.send_ping(1.0, timeout=3.0)
    assert proto.get_timer() == 4.0
    assert proto.handle_timer(4.0) == [PingTimeout(lost)]


def test_read_deadline_120s():
    proto, _, _ = connected()
    proto.receive_data(f.encode_frame(f.KeepAlive()), 10.0)
    assert proto.get_timer() == 130.0
    assert proto.handle_timer(129.0) == []
    with pytest.raises(f.DerpProtocolError, match="nothing received"):
        proto.handle_timer(130.0)


def test_server_token_bucket_is_honoured():
    proto, _, _ = connected(server_info=ServerInfo(token_bucket_bytes_per_second=1317, token_bucket_bytes_burst=2634))
    dst = NodePrivate.generate().public
    assert [proto.send_packet(dst, bytes(1280), 0.0) for _ in range(3)] == [True, True, False]
    assert proto.send_packet(dst, bytes(1280), 1.0) is True
    assert proto.dropped_by_token_bucket == 1


def test_bad_server_key_or_info_is_fatal():
    proto = DerpClientProtocol(NodePrivate.generate(), 0.0)
    with pytest.raises(f.DerpProtocolError):
        proto.receive_data(f.encode_frame(f.KeepAlive()), 0.0)  # ServerKey must come first
    proto, _, _ = connected()
    other = DerpClientProtocol(NodePrivate.generate(), 0.0)
    other.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), 0.0)
    with pytest.raises(f.DerpProtocolError, match="authenticate"):
        other.receive_data(f.encode_frame(f.ServerInfoFrame(bytes(60))), 0.0)
    huge = DerpClientProtocol(NodePrivate.generate(), 0.0)
    with pytest.raises(f.DerpProtocolError, match="over the limit"):
        huge.receive_data(b"\x05" + (2 << 20).to_bytes(4, "big"), 0.0)


def test_derp_node_from_json_and_dial_rules():
    node = DerpNode.from_json({"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                               "IPv6": "none", "DERPPort": 8443, "STUNPort": 3478, "InsecureForTests": True})
    assert node.port == 8443 and node.dial_hosts() == ["127.0.0.1"] and node.insecure_for_tests
    assert DerpNode("a", 1, "derp.example").port == 443
    assert DerpNode("a", 1, "derp.example", plain_http=True).port == 3340
    assert DerpNode("a", 1, "derp.example").dial_hosts() == ["derp.example"]
    ctx, sni = client_ssl_context(node)
    assert sni is None and not ctx.check_hostname  # IP literal: no SNI; verification off
    ctx, sni = client_ssl_context(DerpNode("a", 1, "127.0.0.1", cert_name="derp.internal"))
    assert sni == "derp.internal" and ctx.check_hostname


def test_backoff_schedule():
    class Half:
        def random(self):
            return 0.5

    b = Backoff(rng=Half())
    delays = [b.next_delay() for _ in range(30)]
    assert delays[:3] == pytest.approx([0.01, 0.04, 0.09])
    assert max(delays) == pytest.approx(5.0)
    b.reset()
    assert b.next_delay() == pytest.approx(0.01)


def test_single_region_derp_map_shape():
    from tsnet.derp.derpmap import single_region_derp_map

    m = single_region_derp_map(8443, stun_port=3478, insecure_for_tests=True)
    node = m["Regions"]["900"]["Nodes"][0]
    assert node == {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1", "IPv6": "none",
                    "DERPPort": 8443, "STUNPort": 3478, "STUNTestIP": "127.0.0.1", "InsecureForTests": True}
    assert DerpNode.from_json(node).port == 8443
