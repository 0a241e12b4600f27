"""Random operation sequences on PeerEndpoint: never raises, invariants hold."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.endpoint import (
    TRUST_UDP_ADDR_DURATION,
    DerpPath,
    PeerEndpoint,
    SendPing,
    UDPPath,
)

ADDRS = [AddrPort.parse(s) for s in ("203.0.113.5:1", "192.168.0.9:2", "[2001:db8::1]:3", "[fe80::1]:4", "127.0.0.1:5")]
RELAYS = [UDPPath(AddrPort.parse("192.0.2.1:7000"), 1), UDPPath(AddrPort.parse("192.0.2.2:7000"), 2)]
SERVERS = [DiscoPrivate.generate().public for _ in range(2)]
TXS = [bytes([i]) * 12 for i in range(4)]

paths = st.one_of(st.sampled_from(ADDRS).map(UDPPath), st.sampled_from(RELAYS), st.integers(1, 3).map(DerpPath))
ops = st.one_of(
    st.tuples(st.just("advance"), st.floats(0, 20)),
    st.tuples(st.just("send"), st.none()),
    st.tuples(st.just("timer"), st.none()),
    st.tuples(st.just("ping"), st.tuples(st.sampled_from(TXS), paths)),
    st.tuples(st.just("pong_out"), st.tuples(st.integers(0, 10), paths)),
    st.tuples(st.just("pong_rand"), st.tuples(st.sampled_from(TXS), paths)),
    st.tuples(st.just("cmm"), st.lists(st.sampled_from(ADDRS), max_size=5)),
    st.tuples(st.just("netmap"), st.lists(st.sampled_from(ADDRS), max_size=5)),
    st.tuples(st.just("relay"), st.tuples(st.integers(0, 1), st.floats(0, 0.5))),
    st.tuples(st.just("senderr"), paths),
    st.tuples(st.just("reset"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60), st.booleans(), st.booleans())
def test_random_operations_keep_invariants(seq, relay_capable, heartbeat_disabled):
    ep = PeerEndpoint(
        NodePrivate.generate().public,
        DiscoPrivate.generate().public,
        my_node_key=NodePrivate.generate().public,
        home_derp=1,
        relay_capable=relay_capable,
        heartbeat_disabled=heartbeat_disabled,
    )
    ep.relay_servers_available = True
    now = 0.0
    outstanding: list[SendPing] = []

    def note(actions):
        outstanding.extend(a for a in actions if isinstance(a, SendPing))

    for op, arg in seq:
        if op == "advance":
            now += arg
        elif op == "send":
            note(ep.send_plan(now).actions)
        elif op == "timer":
            t = ep.get_timer()
            if t is not None:
                now = max(now, t)
                note(ep.handle_timer(now))
        elif op == "ping":
            tx, path = arg
            ep.handle_ping(d.Ping(tx), path, now)
        elif op == "pong_out" and outstanding:
            i, path = arg
            sp = outstanding[i % len(outstanding)]
            src = sp.path if i % 2 == 0 else path
            src_addr = src.as_addrport if isinstance(src, DerpPath) else src.addr
            ep.handle_pong(d.Pong(sp.ping.tx_id, src_addr), src, now)
        elif op == "pong_rand":
            tx, path = arg
            ep.handle_pong(d.Pong(tx, ADDRS[0]), path, now)
        elif op == "cmm":
            note(ep.handle_call_me_maybe(d.CallMeMaybe(tuple(arg)), now))
        elif op == "netmap":
            ep.update_from_netmap(arg, now)
        elif op == "relay":
            i, lat = arg
            ep.handle_relay_path_ready(RELAYS[i], SERVERS[i], lat, now)
        elif op == "senderr" and isinstance(arg, UDPPath):
            ep.note_send_error(arg)
        elif op == "reset":
            ep.reset()

        # invariants
        if ep.best is not None:
            if ep.best.path.is_direct:
                assert ep.best.path.addr in ep.candidates
            else:
                assert ep.best.relay_server_disco is not None
        assert ep.trust_until <= now + TRUST_UDP_ADDR_DURATION
        assert all(not (a.ip.version == 6 and a.ip.is_link_local) for a in ep._cmm_endpoints)
        plan = ep.addr_for_send(now)
        if ep.is_trusted(now):
            assert plan.udp == ep.best.path and plan.derp_region is None
        else:
            assert plan.derp_region == 1
        t = ep.get_timer()
        assert t is None or t >= 0
