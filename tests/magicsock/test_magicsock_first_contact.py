"""First contact between two nodes that come up together, and user-requested disco pings.

Sans-IO cores with a fake clock and an in-memory network (UDP + DERP region 900):

* an initiation WireGuard produces while the peer has no path is held and sent the
  moment a path appears (control tells us the peer's home DERP region);
* an initiation that reaches us over DERP from a node control has not told us
  about yet is kept and answered once the netmap lists it;
* a disco message from a peer whose handshake we are waiting for re-sends the
  initiation at once (at most once per second), instead of after REKEY_TIMEOUT;
* ``MagicSock.ping`` reports the first pong's path and latency.

In every first-contact test the first echo completes with a single initiation, long
before WireGuard's own 5 s retry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from tests.magicsock.twocores import TwoCores
from tsnet.control.server import default_derp_map
from tsnet.key import NodePrivate
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import HELD_INITIATION_MAX_AGE, DiscoPingResult, MagicSock, PeerConfig

DERP_MAP = default_derp_map("192.0.2.1", 8080, stun_port=3478)
REKEY_TIMEOUT = 5.0


class Net(TwoCores):
    """Two cores on fixed UDP addresses and DERP region 900; no STUN; ``drop`` filters deliveries."""

    def __init__(self) -> None:
        super().__init__()
        for m in (self.a, self.b):
            m.set_sockets({4: 41641}, [], 0.0)
        #: (sender, "udp" | "derp", payload) -> True to lose the datagram
        self.drop: Callable[[MagicSock, str, bytes], bool] = lambda m, via, data: False

    def config_of(self, m: MagicSock, *, home_derp: int = 900, endpoints: bool = True) -> PeerConfig:
        eps = (self.addr[id(m)],) if endpoints else ()
        return PeerConfig(m.node_key, m.disco_key, eps, home_derp, 133,
                          (ipaddress.ip_network(self.ip[id(m)] + "/32"),), name="peer")

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for m in (self.a, self.b):
                o = self.other(m)
                for data, dest in m.take_udp():
                    moved = True
                    if dest == self.addr[id(o)] and not self.drop(m, "udp", bytes(data)):
                        o.receive_udp(bytes(data), self.addr[id(m)], self.now)
                for region, dst, data in m.take_derp():
                    moved = True
                    assert dst == o.node_key and region == 900
                    if not self.drop(m, "derp", bytes(data)):
                        o.receive_derp(region, m.node_key, bytes(data), self.now)
                for _peer, pkt in m.take_packets():
                    self.received[id(m)].append(pkt)
            if not moved:
                return

    def echo_requests_at(self, m: MagicSock) -> int:
        return len(self.received[id(m)])


def test_initiation_without_a_path_is_held_until_the_home_derp_is_known() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b, home_derp=0, endpoints=False)], 0.0)  # control has no DERP for b yet
    b.set_peers([net.config_of(a)], 0.0)
    net.echo(a, 1)
    assert a.counters["wg_send_no_path"] >= 1 and a.counters["wg_initiation_held"] == 1
    assert net.echo_requests_at(b) == 0
    net.advance(0.3)
    a.set_peers([net.config_of(b, home_derp=900, endpoints=False)], net.now)  # the netmap update arrives
    net.pump()
    assert a.counters["wg_initiation_released"] == 1
    assert net.echo_requests_at(b) == 1  # handshake done and the staged echo delivered at once
    assert a.wg.counters.initiations_sent == 1


def test_held_initiation_goes_when_the_peer_reaches_us_over_derp() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b, home_derp=0, endpoints=False)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.echo(a, 1)
    net.advance(0.5)
    net.echo(b, 1)  # b starts talking first; its initiation reaches a over DERP: a path back
    assert a.counters["wg_initiation_released"] == 1
    assert net.echo_requests_at(a) == 1 and net.echo_requests_at(b) == 1
    assert net.now < 1.0


def test_held_initiation_expires() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b, home_derp=0, endpoints=False)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.echo(a, 1)
    net.now = HELD_INITIATION_MAX_AGE + 0.1  # no timers run: the core's retry has not fired yet
    a.set_peers([net.config_of(b)], net.now)
    assert a.counters["wg_initiation_held_expired"] == 1
    assert a.counters.get("wg_initiation_released", 0) == 0


def test_initiation_from_a_node_not_yet_in_the_netmap_is_answered_when_it_appears() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([], 0.0)  # b's netmap does not list a yet
    net.echo(a, 1)
    assert b.counters["derp_from_unknown_peer"] >= 1 and b.counters["wg_initiation_unknown_kept"] >= 1
    net.advance(0.4)
    assert net.echo_requests_at(b) == 0
    b.set_peers([net.config_of(a)], net.now)
    net.pump()
    assert b.counters["wg_initiation_replayed"] == 1
    assert net.echo_requests_at(b) == 1
    assert net.now < 1.0 and a.wg.counters.initiations_sent == 1


def test_unknown_initiations_are_bounded() -> None:
    net = Net()
    b = net.b
    for _ in range(40):
        b.receive_derp(900, NodePrivate.generate().public, b"\x01" + bytes(147), 0.0)
    assert len(b._unknown_initiations) == 16
    b.receive_derp(900, NodePrivate.generate().public, b"\x01" + bytes(20), 0.0)  # not an initiation
    assert len(b._unknown_initiations) == 16


def test_disco_from_the_peer_retries_a_pending_handshake_at_once() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    lost: list[bytes] = []

    def lose_first_initiation(m: MagicSock, via: str, data: bytes) -> bool:
        if m is a and len(data) == 148 and data[0] == 1 and not lost:
            lost.append(data)
            return True
        return False

    net.drop = lose_first_initiation
    net.echo(a, 1)
    assert lost and net.echo_requests_at(b) == 0
    # a's discovery pings reached b within the same instant: too soon to retry.
    assert a.counters.get("wg_handshake_retried_on_disco", 0) == 0
    net.advance(1.2)
    assert net.echo_requests_at(b) == 0
    b.ping(a.node_key, net.now)  # any disco from b proves it can answer now
    net.pump()
    assert a.counters["wg_handshake_retried_on_disco"] == 1
    assert net.echo_requests_at(b) == 1 and net.now < REKEY_TIMEOUT
    assert a.wg.counters.initiations_sent == 2


def test_disco_retry_is_rate_limited() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.drop = lambda m, via, data: m is a and len(data) == 148 and data[0] == 1  # every initiation lost
    net.echo(a, 1)
    net.advance(1.5)
    for _ in range(5):
        b.ping(a.node_key, net.now)
        net.pump()
    assert a.counters["wg_handshake_retried_on_disco"] == 1
    net.now += 0.5
    b.ping(a.node_key, net.now)
    net.pump()
    assert a.counters["wg_handshake_retried_on_disco"] == 1
    net.now += 0.6
    b.ping(a.node_key, net.now)
    net.pump()
    assert a.counters["wg_handshake_retried_on_disco"] == 2


def test_no_retry_once_the_session_is_up() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.echo(a, 1)
    assert net.echo_requests_at(b) == 1
    net.advance(2.0)
    b.ping(a.node_key, net.now)
    net.pump()
    assert a.counters.get("wg_handshake_retried_on_disco", 0) == 0
    assert a.wg.counters.initiations_sent == 1


# --- user-requested disco pings ---------------------------------------------------------------


def _results(m: MagicSock) -> list[DiscoPingResult]:
    return [e for e in m.take_events() if isinstance(e, DiscoPingResult)]


def test_cli_ping_before_any_traffic_answers_and_finds_the_direct_path() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    req = a.ping(b.node_key, 0.0)
    net.pump()
    (r,) = _results(a)
    assert r.request == req and r.peer == b.node_key and r.latency == 0.0
    assert r.kind in ("direct", "derp")
    assert r.path in ("direct 203.0.113.1:41641", "derp region 900")
    # The CLI ping's direct pong also made the direct path the best one.
    assert a.peer_status(b.node_key, net.now).kind == "direct"
    assert b.counters["disco_recv_ping"] >= 2  # DERP and the candidate address


def test_cli_ping_on_a_trusted_direct_path() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.echo(a, 1)
    assert a.peer_status(b.node_key, net.now).trusted
    net.now = 0.25
    a.take_events()
    pings_before = b.counters["disco_recv_ping"]
    req = a.ping(b.node_key, net.now)
    net.now = 0.25 + 0.003  # the pong takes 3 ms
    net.pump()
    (r,) = _results(a)
    assert r.request == req and r.kind == "direct" and r.addr == "203.0.113.1:41641" and r.derp_region is None
    assert r.path == "direct 203.0.113.1:41641"
    assert r.latency == pytest.approx(0.003)
    assert r.pong_src == AddrPort.parse("198.51.100.1:41641")
    assert b.counters["disco_recv_ping"] == pings_before + 1  # trusted path: pinged alone


def test_cli_ping_over_derp_when_direct_is_blocked() -> None:
    net = Net()
    a, b = net.a, net.b
    a.set_peers([net.config_of(b)], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    net.drop = lambda m, via, data: via == "udp"
    req = a.ping(b.node_key, 0.0)
    net.pump()
    (r,) = _results(a)
    assert r.request == req and r.kind == "derp" and r.derp_region == 900 and r.addr is None
    assert r.path == "derp region 900"


def test_cli_ping_errors_and_cancel() -> None:
    net = Net()
    a, b = net.a, net.b
    with pytest.raises(KeyError):
        a.ping(b.node_key, 0.0)
    a.set_peers([net.config_of(b, home_derp=0, endpoints=False)], 0.0)
    with pytest.raises(ValueError, match="no path"):
        a.ping(b.node_key, 0.0)
    cfg = net.config_of(b)
    a.set_peers([], 0.0)
    a.set_peers([PeerConfig(cfg.node_key, None, cfg.endpoints, 900, 133, cfg.allowed_ips)], 0.0)
    with pytest.raises(ValueError, match="disco key"):
        a.ping(b.node_key, 0.0)
    a.set_peers([cfg], 0.0)
    b.set_peers([net.config_of(a)], 0.0)
    req = a.ping(b.node_key, 0.0)
    a.cancel_ping(req)
    net.pump()
    assert _results(a) == []
    a.cancel_ping(12345)  # unknown ids are ignored
