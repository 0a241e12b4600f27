"""magicsock through NATs in the namespace lab (tests/lab/nat_topology.py), Python nodes only.

Each node: our control client + MagicSock + WireGuard, answering ICMP echo
(raw IPv4 packets) over the tailnet. Our control server (with embedded DERP
and STUN) sits on the "internet" namespace.

* public <-> easy NAT: direct.
* easy <-> easy: traffic starts over DERP, then hole punching goes direct.
* hard <-> hard (no relay): stays on DERP, traffic still flows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab
from tests.lab.nat_topology import RELAY_POLICY, NatTopology, PyNode, start_tailscaled_node

pytestmark = pytest.mark.interop

TIMEOUT = 25.0


def _wait(cond, what: str, topo: NatTopology, timeout: float = TIMEOUT) -> None:
    topo.wait(cond, what, timeout)


def _pair(lab: Lab, tmp_path: Path, kind_a: str, kind_b: str) -> tuple[NatTopology, PyNode, PyNode]:
    topo = NatTopology(lab, tmp_path)
    topo.start_control()
    ha, hb = topo.add_host("a", kind_a), topo.add_host("b", kind_b)
    a = topo.start_python_node(ha, ping="b")
    b = topo.start_python_node(hb)
    return topo, a, b


def _replies_flow(node: PyNode, topo: NatTopology, more_than: int = 0) -> int:
    _wait(lambda: node.status().get("replies", 0) > more_than, "echo replies", topo)
    return node.status()["replies"]


def test_public_to_easy_nat_goes_direct(lab: Lab, tmp_path: Path) -> None:
    topo, a, b = _pair(lab, tmp_path, "easy", "public")
    _replies_flow(a, topo)
    _wait(lambda: a.path_kind("b") == "direct" and b.path_kind("a") == "direct", "direct path both ways", topo)
    pa, pb = a.peer("b"), b.peer("a")
    # a (behind the NAT) talks to b's own address; b talks to a's NAT mapping on the router's WAN side.
    assert pa["addr"] == f"{topo.hosts['b'].public_ip}:41641"
    assert pb["addr"].startswith(topo.hosts["a"].public_ip + ":")
    # a's STUN endpoint is its router's WAN address (easy NAT keeps the port).
    assert f"{topo.hosts['a'].public_ip}:41641" in a.status()["endpoints"]
    n = _replies_flow(a, topo)
    _replies_flow(a, topo, n + 5)


def test_easy_to_easy_starts_on_derp_then_goes_direct(lab: Lab, tmp_path: Path) -> None:
    topo, a, b = _pair(lab, tmp_path, "easy", "easy")
    _replies_flow(a, topo)
    # The first WireGuard packets went over DERP (no path was confirmed yet).
    _wait(lambda: b.status()["counters"].get("wg_received_derp", 0) > 0, "WireGuard via DERP", topo)
    _wait(lambda: a.path_kind("b") == "direct" and b.path_kind("a") == "direct", "direct path both ways", topo)
    assert a.peer("b")["addr"] == f"{topo.hosts['b'].public_ip}:41641"
    assert b.peer("a")["addr"] == f"{topo.hosts['a'].public_ip}:41641"
    st = a.status()
    assert st["counters"].get("disco_sent_callmemaybe", 0) + b.status()["counters"].get(
        "disco_sent_callmemaybe", 0) > 0
    # Once direct, WireGuard stops going to DERP.
    derp_sent = st["counters"].get("wg_sent_derp", 0)
    n = _replies_flow(a, topo, st["replies"])
    _replies_flow(a, topo, n + 5)
    assert a.status()["counters"].get("wg_sent_derp", 0) == derp_sent


def test_hard_to_hard_without_relay_stays_on_derp(lab: Lab, tmp_path: Path) -> None:
    topo, a, b = _pair(lab, tmp_path, "hard", "hard")
    _replies_flow(a, topo)
    # Give discovery its chance: CallMeMaybe received and pings answered-or-not on both sides.
    _wait(lambda: b.status()["counters"].get("disco_recv_callmemaybe", 0) > 0
          and a.status()["counters"].get("disco_sent_ping", 0) >= 2, "hole punching attempted", topo)
    n = _replies_flow(a, topo, a.status()["replies"] + 10)
    for node, peer in ((a, "b"), (b, "a")):
        p = node.peer(peer)
        assert p["kind"] == "derp" and not p["trusted"], p
    assert n > 10
    assert b.status()["counters"].get("wg_received_derp", 0) > 10


def test_tailscaled_peer_behind_easy_nat_pings_our_node_direct(lab: Lab, tmp_path: Path, tailscale_binaries) -> None:
    """Real tailscaled 1.96.4 as one peer: disco ping, direct path both ways, ICMP over WireGuard."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control()
    hp, ht = topo.add_host("py", "easy"), topo.add_host("ts", "easy")
    py = topo.start_python_node(hp, ping="ts")
    ts = start_tailscaled_node(topo, ht, tailscale_binaries)
    _wait(lambda: ts.peer("py") is not None and py.peer("ts") is not None, "both see each other", topo)
    # Our node's ICMP echo requests are answered by tailscaled's netstack.
    _replies_flow(py, topo)
    # tailscaled's disco ping reaches our node and our pong comes back directly.
    py_ip = py.status()["ip"]
    out = ts.cli("ping", "--c", "20", "--timeout", "3s", py_ip, timeout=90)
    assert "pong from py" in out and "via DERP" not in out.splitlines()[-1], out
    assert f"via {topo.hosts['py'].public_ip}:41641" in out, out
    _wait(lambda: py.path_kind("ts") == "direct", "our node direct to tailscaled", topo)
    assert py.peer("ts")["addr"] == f"{topo.hosts['ts'].public_ip}:41641"
    peer = ts.peer("py")
    assert peer["CurAddr"] == f"{topo.hosts['py'].public_ip}:41641", peer
    n = _replies_flow(py, topo)
    _replies_flow(py, topo, n + 5)


def test_hard_to_hard_moves_to_python_peer_relay(lab: Lab, tmp_path: Path) -> None:
    """A public Python node runs a relay server granted by policy: hard<->hard leaves DERP for the relay."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=RELAY_POLICY)
    hr = topo.add_host("relay", "public")
    relay = topo.start_python_node(hr, relay_server_port=40000)
    _wait(lambda: (relay.status().get("relay_server") or {}).get("addr_ports"), "relay server ready", topo)
    ha, hb = topo.add_host("a", "hard"), topo.add_host("b", "hard")
    b = topo.start_python_node(hb)
    _wait(lambda: b.peer("relay") is not None, "b sees the relay", topo)
    a = topo.start_python_node(ha, ping="b")
    _replies_flow(a, topo)
    want = f"{hr.public_ip}:40000:vni:"
    _wait(lambda: a.path_kind("b") == "peer-relay" and b.path_kind("a") == "peer-relay", "relay path both ways",
          topo)
    assert a.peer("b")["addr"].startswith(want) and b.peer("a")["addr"].startswith(want)
    # WireGuard now flows through the relay server, not DERP.
    derp_sent = a.status()["counters"].get("wg_sent_derp", 0)
    n = _replies_flow(a, topo, a.status()["replies"])
    _replies_flow(a, topo, n + 5)
    assert a.status()["counters"].get("wg_sent_derp", 0) == derp_sent
    assert relay.status()["relay_server"]["forwarded_packets"] > 10
    assert relay.status()["relay_server"]["endpoints"].get("open", 0) >= 1


def test_tailscaled_and_our_node_behind_hard_nats_use_our_peer_relay(lab: Lab, tmp_path: Path,
                                                                       tailscale_binaries) -> None:
    """tailscaled 1.96.4 (hard NAT) <-> our node (hard NAT) through our Python relay server."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=RELAY_POLICY)
    hr = topo.add_host("relay", "public")
    relay = topo.start_python_node(hr, relay_server_port=40000)
    _wait(lambda: (relay.status().get("relay_server") or {}).get("addr_ports"), "relay server ready", topo)
    hp, ht = topo.add_host("py", "hard"), topo.add_host("ts", "hard")
    ts = start_tailscaled_node(topo, ht, tailscale_binaries)
    _wait(lambda: ts.peer("relay") is not None, "tailscaled sees the relay", topo)
    py = topo.start_python_node(hp, ping="ts")
    _wait(lambda: ts.peer("py") is not None and py.peer("ts") is not None, "both see each other", topo)
    _replies_flow(py, topo)
    want = f"{hr.public_ip}:40000:vni:"
    _wait(lambda: py.path_kind("ts") == "peer-relay", "our node on the relay path", topo)
    assert py.peer("ts")["addr"].startswith(want)
    out = ts.cli("ping", "--until-direct=false", "--c", "5", "--timeout", "3s", py.status()["ip"], timeout=60)
    assert f"via peer-relay({hr.public_ip}:40000:vni:" in out, out
    _wait(lambda: (ts.peer("py") or {}).get("PeerRelay", "").startswith(f"{hr.public_ip}:40000"),
          "tailscaled status shows the peer relay", topo)
    n = _replies_flow(py, topo)
    _replies_flow(py, topo, n + 5)
    assert relay.status()["relay_server"]["forwarded_packets"] > 10
