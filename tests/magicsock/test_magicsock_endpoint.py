"""Per-peer path selection with a fake clock: one test per tailscaled rule."""

from __future__ import annotations

import pytest

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.endpoint import (
    AddrQuality,
    BestPathChanged,
    DerpPath,
    PeerEndpoint,
    PingPurpose,
    SendCallMeMaybe,
    SendPing,
    SendPong,
    StartRelayDiscovery,
    UDPPath,
    better_addr,
)

ME = NodePrivate.generate().public
PEER = NodePrivate.generate().public
PEER_DISCO = DiscoPrivate.generate().public
SERVER_DISCO = DiscoPrivate.generate().public
PUB = AddrPort.parse("203.0.113.5:41641")
PUB2 = AddrPort.parse("198.51.100.7:41641")
LAN = AddrPort.parse("192.168.1.5:41641")
V6 = AddrPort.parse("[2001:db8::5]:41641")
RELAY = UDPPath(AddrPort.parse("192.0.2.50:40000"), vni=7)


def q(addr, ms, vni=None, mtu=1360):
    return AddrQuality(UDPPath(addr if isinstance(addr, AddrPort) else AddrPort.parse(addr), vni), ms / 1000, mtu)


def pings(actions):
    return [a for a in actions if isinstance(a, SendPing)]


def make(endpoints=(PUB,), **kw):
    ep = PeerEndpoint(PEER, PEER_DISCO, my_node_key=ME, home_derp=1, **kw)
    ep.update_from_netmap(endpoints, 0.0)
    return ep


def answer(ep, ping_action, now, src=None):
    """The peer's pong for one of our pings, arriving from the address we pinged."""
    src = src or ping_action.path
    return ep.handle_pong(d.Pong(ping_action.ping.tx_id, AddrPort.parse("100.64.0.1:1")), src, now)


# --- better_addr -------------------------------------------------------------------


def test_better_addr_same_path_only_on_bigger_mtu():
    assert better_addr(q(PUB, 10, mtu=1400), q(PUB, 5))
    assert not better_addr(q(PUB, 1), q(PUB, 50))


def test_better_addr_invalid_sides():
    assert better_addr(q(PUB, 10), None)
    assert not better_addr(None, q(PUB, 10))


def test_direct_always_beats_relay():
    assert better_addr(q(PUB, 200), q("192.0.2.50:40000", 1, vni=7))
    assert not better_addr(q("192.0.2.50:40000", 1, vni=7), q(PUB, 200))


def test_latency_hysteresis_one_percent():
    assert not better_addr(q(PUB2, 99.5), q(PUB, 100))  # 1 point: not enough
    assert better_addr(q(PUB2, 98), q(PUB, 100))
    assert not better_addr(q(PUB2, 100), q(PUB, 100))


def test_address_bonuses():
    # equal latency: private beats public, loopback beats private, IPv6 +10
    assert better_addr(q(LAN, 10), q(PUB, 10))
    assert better_addr(q("127.0.0.1:1", 10), q(LAN, 10))
    assert better_addr(q("169.254.1.1:1", 10), q(LAN, 10))
    assert better_addr(q(V6, 10), q(PUB, 10))
    # IPv6 wins over IPv4 that is only 5 % faster, but not over one 20 % faster
    assert not better_addr(q(PUB, 9.5), q(V6, 10))
    assert better_addr(q(PUB, 8), q(V6, 10))


# --- direct path discovery ----------------------------------------------------------------


def test_first_send_goes_via_derp_and_starts_discovery():
    ep = make((PUB, LAN))
    plan = ep.send_plan(0.0)
    assert plan.udp is None and plan.derp_region == 1
    ps = pings(plan.actions)
    assert {p.path for p in ps} == {UDPPath(PUB), UDPPath(LAN)}
    assert all(p.ping.node_key == ME and p.purpose is PingPurpose.DISCOVERY for p in ps)
    assert SendCallMeMaybe(1) in plan.actions
    assert ep.get_timer() == 3.0  # heartbeat armed (pings time out at 5 s)


def test_pong_makes_trusted_direct_path():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    acts = answer(ep, p, 0.040)
    assert [type(a) for a in acts] == [BestPathChanged]
    assert ep.best.path == UDPPath(PUB) and ep.best.latency == pytest.approx(0.040)
    assert ep.trust_until == pytest.approx(6.54)
    plan = ep.send_plan(1.0)
    assert plan.udp == UDPPath(PUB) and plan.derp_region is None and plan.actions == ()
    assert ep.candidate_latency(PUB) == pytest.approx(0.040)


def test_unknown_pong_and_derp_pong_do_not_set_path():
    ep = make()
    assert ep.handle_pong(d.Pong(bytes(12), PUB), UDPPath(PUB), 0.1) == []
    [p] = pings(ep.send_plan(0.0).actions)
    assert answer(ep, p, 0.1, src=DerpPath(1)) == []
    assert ep.best is None


def test_untrusted_path_is_used_together_with_derp():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.01)
    plan = ep.send_plan(6.52)  # trust ran out at 6.51
    assert plan.udp == UDPPath(PUB) and plan.derp_region == 1
    assert pings(plan.actions)  # and we re-ping the candidates


def test_better_by_enough_rule_on_pongs():
    ep = make((PUB, PUB2))
    ps = {p.path.addr: p for p in pings(ep.send_plan(0.0).actions)}
    answer(ep, ps[PUB], 0.100)
    assert ep.best.path.addr == PUB
    answer(ep, ps[PUB2], 0.0995)  # 0.5 % faster: stay
    assert ep.best.path.addr == PUB
    ps = {p.path.addr: p for p in pings(ep.send_plan(7.0).actions)}  # untrusted again: re-ping
    answer(ep, ps[PUB2], 7.050)  # PUB2 now 50 ms vs PUB's recorded 100 ms
    assert ep.best.path.addr == PUB2


def test_ping_interval_per_candidate():
    ep = make()
    assert len(pings(ep.send_plan(0.0).actions)) == 1
    assert pings(ep.send_plan(4.9).actions) == []
    assert len(pings(ep.send_plan(5.0).actions)) == 1


def test_heartbeats_keep_trust_and_stop_when_idle():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.001)  # 1 ms: good enough, no periodic full pings
    t = 3.0
    while t <= 45.0:
        assert ep.get_timer() == pytest.approx(t)
        acts = ep.handle_timer(t)
        [hb] = pings(acts)
        assert hb.purpose is PingPurpose.HEARTBEAT and hb.path == UDPPath(PUB)
        answer(ep, hb, t + 0.001)
        assert ep.is_trusted(t + 6)
        t += 3.0
    # 48 s: more than 45 s since the only send -> heartbeats end
    assert ep.handle_timer(48.0) == []
    assert ep.get_timer() is None
    # a new send re-arms them
    ep.send_plan(50.0)
    assert ep.get_timer() == 53.0


def test_heartbeat_full_ping_rules():
    ep = make((PUB, PUB2))
    ps = {p.path.addr: p for p in pings(ep.send_plan(0.0).actions)}
    answer(ep, ps[PUB], 0.020)  # 20 ms: above goodEnoughLatency, so re-probe every 60 s
    t = 3.0
    while t < 60.0:
        ep.send_plan(t - 1)  # keep the session active
        acts = ep.handle_timer(t)
        assert [p.purpose for p in pings(acts)] == [PingPurpose.HEARTBEAT]
        answer(ep, pings(acts)[0], t + 0.02)
        t += 3.0
    ep.send_plan(t - 1)
    acts = ep.handle_timer(t)  # 60 s after the last full round
    assert t == 60.0
    assert {(p.path.addr, p.purpose) for p in pings(acts)} == {
        (PUB, PingPurpose.HEARTBEAT),
        (PUB2, PingPurpose.DISCOVERY),
    }
    assert SendCallMeMaybe(1) in acts


def test_good_enough_latency_suppresses_full_rounds():
    ep = make((PUB, PUB2))
    ps = {p.path.addr: p for p in pings(ep.send_plan(0.0).actions)}
    answer(ep, ps[PUB], 0.002)
    for t in range(3, 120, 3):
        ep.send_plan(float(t) - 0.5)
        acts = ep.handle_timer(float(t))
        assert all(p.purpose is PingPurpose.HEARTBEAT for p in pings(acts))
        for p in pings(acts):
            answer(ep, p, t + 0.002)
    assert not ep.want_full_ping(120.0)


def test_direct_best_timeout_leaves_it_untrusted_and_falls_back_to_derp():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.01)
    # the path dies: heartbeats go unanswered
    for t in (3.0, 6.0, 9.0, 12.0):
        ep.handle_timer(t)
    assert ep.best is not None and ep.best.path == UDPPath(PUB)  # 1.96.4 keeps it...
    plan = ep.addr_for_send(12.0)
    assert plan.udp == UDPPath(PUB) and plan.derp_region == 1  # ...but adds DERP


# --- incoming pings and CallMeMaybe -------------------------------------------------------


def test_ping_from_new_address_adds_candidate_and_pongs():
    ep = make(())
    src = UDPPath(PUB2)
    ping = d.Ping(b"A" * 12, PEER)
    acts = ep.handle_ping(ping, src, 1.0)
    assert acts == [SendPong(src, d.Pong(b"A" * 12, PUB2))]
    assert PUB2 in ep.candidates
    # the same TxID again from there is a duplicate: no pong
    assert ep.handle_ping(ping, src, 1.1) == []
    # and we ping the new candidate on our next round
    assert [p.path for p in pings(ep.send_plan(2.0).actions)] == [src]


def test_runtime_candidate_expires_45s_after_last_ping():
    ep = make(())
    ep.handle_ping(d.Ping(b"A" * 12), UDPPath(PUB2), 0.0)
    ep.handle_ping(d.Ping(b"B" * 12), UDPPath(PUB2), 10.0)  # refreshes
    ep.send_plan(50.0)
    assert PUB2 in ep.candidates
    ep.send_plan(55.1)
    assert PUB2 not in ep.candidates


def test_derp_and_relay_pings_get_pongs_on_the_same_path():
    ep = make(())
    acts = ep.handle_ping(d.Ping(b"D" * 12), DerpPath(9), 1.0)
    assert acts == [SendPong(DerpPath(9), d.Pong(b"D" * 12, AddrPort.parse("127.3.3.40:9")))]
    assert ep.last_derp_region_heard == 9
    acts = ep.handle_ping(d.Ping(b"R" * 12), RELAY, 1.0)
    assert acts == [SendPong(RELAY, d.Pong(b"R" * 12, RELAY.addr))]
    assert RELAY.addr not in ep.candidates  # relay paths are never candidates


def test_call_me_maybe_pings_everything_at_once_without_cmm_back():
    ep = make((PUB,))
    ep.send_plan(0.0)  # pinged PUB at 0
    cmm = d.CallMeMaybe((PUB, PUB2, AddrPort.parse("[fe80::1]:41641")))
    acts = ep.handle_call_me_maybe(cmm, 1.0)
    assert {p.path.addr for p in pings(acts)} == {PUB, PUB2}  # last-ping times were reset
    assert not any(isinstance(a, SendCallMeMaybe) for a in acts)
    assert AddrPort.parse("[fe80::1]:41641") not in ep.candidates


def test_next_call_me_maybe_replaces_the_cmm_set_and_clears_best():
    ep = make(())
    acts = ep.handle_call_me_maybe(d.CallMeMaybe((PUB, PUB2)), 0.0)
    ps = {p.path.addr: p for p in pings(acts)}
    answer(ep, ps[PUB2], 0.01)
    assert ep.best.path.addr == PUB2
    acts = ep.handle_call_me_maybe(d.CallMeMaybe((PUB,)), 1.0)
    assert PUB2 not in ep.candidates and ep.best is None
    assert any(isinstance(a, BestPathChanged) and a.new is None for a in acts)
    ep.handle_call_me_maybe(d.CallMeMaybe(()), 2.0)  # empty list: forget all CMM endpoints
    assert ep.candidates == {}


def test_netmap_removal_clears_best_but_cmm_endpoint_survives():
    ep = make((PUB, PUB2))
    ep.handle_call_me_maybe(d.CallMeMaybe((PUB2,)), 0.0)
    ps = {p.path.addr: p for p in pings(ep.send_plan(0.0).actions + tuple(ep.handle_call_me_maybe(d.CallMeMaybe((PUB2,)), 0.0)))}
    answer(ep, ps[PUB], 0.01)
    assert ep.best.path.addr == PUB
    ep.update_from_netmap([], 1.0)
    assert ep.best is None
    assert PUB not in ep.candidates and PUB2 in ep.candidates


def test_disco_key_change_resets_path_state():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.01)
    acts = ep.update_from_netmap([PUB], 1.0, disco_key=DiscoPrivate.generate().public)
    assert ep.best is None and ep.pings_in_flight == 0
    assert any(isinstance(a, BestPathChanged) for a in acts)
    assert ep.candidates[PUB].last_ping is None


def test_send_error_clears_best():
    ep = make()
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.01)
    ep.note_send_error(UDPPath(PUB))
    assert ep.best is None
    plan = ep.send_plan(1.0)
    assert plan.udp is None and plan.derp_region == 1


def test_derp_fallback_region_and_no_route():
    ep = PeerEndpoint(PEER, PEER_DISCO, my_node_key=ME, home_derp=0)
    assert not ep.addr_for_send(0).has_route
    ep.handle_ping(d.Ping(b"x" * 12), DerpPath(4), 0)
    assert ep.addr_for_send(0).derp_region == 4


def test_silent_disco_trust_from_received_traffic():
    ep = make(heartbeat_disabled=True)
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.01)
    assert ep.get_timer() is None  # no heartbeat timer, no ping in flight
    ep.note_recv_activity(UDPPath(PUB), 6.0)
    assert ep.is_trusted(12.0)


# --- relay paths ---------------------------------------------------------------------------


def relay_ready(ep, now, latency=0.030, server=SERVER_DISCO, path=RELAY):
    return ep.handle_relay_path_ready(path, server, latency, now)


def test_relay_beats_derp_and_carries_wireguard():
    ep = make((), relay_capable=True)
    relay_ready(ep, 1.0)
    plan = ep.send_plan(2.0)
    assert plan.udp == RELAY and plan.derp_region is None
    assert ep.best.relay_server_disco == SERVER_DISCO


def test_direct_pong_replaces_relay_path():
    ep = make((PUB,), relay_capable=True)
    relay_ready(ep, 0.0, latency=0.001)
    [p] = pings(ep.send_plan(0.5).actions)  # trusted relay is not direct: keep discovering
    answer(ep, p, 0.8)  # 300 ms, still wins
    assert ep.best.path == UDPPath(PUB)


def test_relay_does_not_replace_trusted_direct():
    ep = make((PUB,), relay_capable=True)
    [p] = pings(ep.send_plan(0.0).actions)
    answer(ep, p, 0.2)
    assert relay_ready(ep, 1.0, latency=0.001) == []
    assert ep.best.path == UDPPath(PUB)
    # once the direct path is untrusted, a ready relay takes over
    relay_ready(ep, 7.0)
    assert ep.best.path == RELAY


def test_same_relay_server_new_vni_replaces():
    ep = make((), relay_capable=True)
    relay_ready(ep, 0.0, latency=0.001)
    relay_ready(ep, 1.0, latency=0.500, path=UDPPath(RELAY.addr, vni=8))
    assert ep.best.path.vni == 8


def test_relay_heartbeat_extends_trust_and_timeout_clears_untrusted_relay():
    ep = make((), relay_capable=True)
    relay_ready(ep, 0.0)
    ep.send_plan(0.0)
    [hb] = pings(ep.handle_timer(3.0))
    assert hb.path == RELAY and hb.purpose is PingPurpose.HEARTBEAT
    answer(ep, hb, 3.03)
    assert ep.trust_until == pytest.approx(9.53) and ep.best.relay_server_disco == SERVER_DISCO
    # relay goes silent: pings time out; once untrusted a timeout drops the path -> DERP only
    for t in (6.0, 9.0, 12.0, 15.0):
        ep.handle_timer(t)
    assert ep.best is None
    plan = ep.addr_for_send(15.0)
    assert plan.udp is None and plan.derp_region == 1


def test_relay_discovery_rules():
    ep = make((), relay_capable=True)
    assert not ep.want_relay_discovery(0.0)  # no relay servers known
    ep.relay_servers_available = True
    assert StartRelayDiscovery(PEER) in ep.send_plan(0.0).actions
    assert StartRelayDiscovery(PEER) not in ep.send_plan(29.0).actions  # 30 s minimum gap
    assert StartRelayDiscovery(PEER) in ep.send_plan(30.0).actions
    # on a trusted relay path: only once 60 s have passed since the last discovery
    relay_ready(ep, 40.0)
    ep.trust_until = 1000.0
    assert not ep.want_relay_discovery(70.0)
    assert ep.want_relay_discovery(90.0)


def test_no_relay_discovery_on_trusted_direct_or_old_peer():
    ep = make((PUB,), relay_capable=True)
    ep.relay_servers_available = True
    acts = ep.send_plan(0.0).actions
    answer(ep, pings(acts)[0], 0.01)
    ep._last_relay_discovery = None  # isolate the trusted-direct rule from the 30 s gap
    assert not ep.want_relay_discovery(1.0)
    assert ep.want_relay_discovery(7.0)  # direct path no longer trusted
    old = make((), relay_capable=False)  # peer below capability version 121
    old.relay_servers_available = True
    assert not old.want_relay_discovery(0.0)
    assert StartRelayDiscovery(PEER) not in old.send_plan(0.0).actions


def test_call_me_maybe_triggers_relay_discovery():
    ep = make((), relay_capable=True)
    ep.relay_servers_available = True
    assert StartRelayDiscovery(PEER) in ep.handle_call_me_maybe(d.CallMeMaybe((PUB,)), 0.0)
