"""Two sans-IO Stacks driven by random application calls, packet loss and time: table invariants hold."""

from __future__ import annotations

import random

import pytest

from tests.netstack.netutil import A4, A6, B4, B6
from tsnet.netstack.stack import Stack
from tsnet.netstack.tcp import TCPOptions, TCPState

OPTS = TCPOptions(recv_buffer=16384, recv_buffer_max=16384, send_buffer=16384, time_wait=1.0,
                  fin_wait_2_timeout=5.0, syn_retries=3, data_retries=4)


def check_invariants(s: Stack) -> None:
    conns = s.connections
    for key, conn in conns.items():
        assert conn.state != TCPState.CLOSED, conn
        assert key == (conn.local_ip, conn.local_port, conn.remote_ip, conn.remote_port)
    # Every armed timer belongs to a live connection; every live connection with a timer is armed.
    live = set(conns.values())
    assert set(s._deadline_of) <= live
    for conn in live:
        t = conn.get_timer()
        if t is not None:
            assert s._deadline_of.get(conn) == t, (conn, t, s._deadline_of.get(conn))
    # Half-open bookkeeping agrees everywhere.
    half = sum(len(listener.half_open) for listener in s.listeners.values())
    assert s._half_open == len(s._listener_of) == sum(s._half_open_by_src.values())
    assert half <= s._half_open  # closed listeners' half-open connections were reset
    for conn, listener in s._listener_of.items():
        assert conn in listener.half_open and conn in live and not conn.is_established
    for listener in s.listeners.values():
        assert len(listener.accept_queue) <= listener.backlog
        assert len(listener.half_open) <= listener.backlog
    if (t := s.get_timer()) is not None:
        assert t == min([d for d in s._deadline_of.values()]
                        + [d for d in (s._reassembler.next_deadline(), s._reassembler6.next_deadline()) if d])


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_tables_consistent(seed: int) -> None:
    rng = random.Random(seed)
    now = 0.0
    a = Stack([A4, A6], now=now, tcp_options=OPTS, max_half_open=12, rng=rng.randbytes)
    b = Stack([B4, B6], now=now, tcp_options=OPTS, max_half_open=12, rng=rng.randbytes)
    stacks = {"a": (a, b, [B4, B6]), "b": (b, a, [A4, A6])}
    listeners = {"a": {}, "b": {}}
    apps = {"a": [], "b": []}  # connections the "application" holds
    loss = rng.choice([0.0, 0.05, 0.3])
    for name in "ab":
        listeners[name][80] = stacks[name][0].tcp_listen(80, backlog=8)

    def pump() -> None:
        for _ in range(50):
            moved = False
            for src, dst in ((a, b), (b, a)):
                out = src.packets_to_send()
                if out:
                    moved = True
                    dst.receive_packets([p for p in out if rng.random() >= loss], now)
            if not moved:
                return

    for _step in range(1000):
        name = rng.choice("ab")
        s, _other, peer_ips = stacks[name]
        op = rng.choice([0, 1, 2, 2, 3, 4, 4, 5, 5, 5, 6, 6, 7, 7, 7, 8, 9, 9, 10])
        if op == 0 and len(listeners[name]) < 3:
            port = rng.choice([80, 81, 82])
            if port not in listeners[name]:
                listeners[name][port] = s.tcp_listen(port, backlog=rng.choice([1, 2, 8]))
        elif op == 1 and listeners[name] and rng.random() < 0.2:
            port = rng.choice(list(listeners[name]))
            s.close_listener(listeners[name].pop(port), now)
        elif op == 2:
            apps[name].append(s.tcp_connect(rng.choice(peer_ips), 80, now))
        elif op == 3:
            apps[name].append(s.tcp_connect(rng.choice(peer_ips), rng.choice([81, 82, 83]), now))
        elif op == 4:
            for listener in listeners[name].values():
                while (conn := s.tcp_accept(listener)) is not None:
                    apps[name].append(conn)
        elif op in (5, 6) and apps[name]:
            conn = rng.choice(apps[name])
            if conn.error is None and conn.is_established and conn.state in (TCPState.ESTABLISHED,
                                                                             TCPState.CLOSE_WAIT):
                s.tcp_send(conn, rng.randbytes(rng.randrange(1, 5000)), now)
        elif op == 7 and apps[name]:
            conn = rng.choice(apps[name])
            if conn.readable:
                s.tcp_receive(conn, rng.randrange(1, 20000), now)
        elif op == 8 and apps[name]:
            conn = apps[name].pop(rng.randrange(len(apps[name])))
            how = rng.choice([s.tcp_close, s.tcp_abort, s.tcp_shutdown])
            how(conn, now)
            if how == s.tcp_shutdown:
                apps[name].append(conn)  # half-closed: the app still holds it (and reads from it)
        elif op == 9:
            now += rng.choice([0.001, 0.05, 0.3, 1.5, 10.0])
            for st in (a, b):
                while (t := st.get_timer()) is not None and t <= now:
                    st.handle_timer(t)
        pump()
        for st in (a, b):
            st.take_changed()
            check_invariants(st)
            assert st.counters.internal_errors == 0
    # Let everything run out: every connection ends, every table empties except listeners' accept queues.
    for name in "ab":
        s = stacks[name][0]
        for conn in apps[name]:
            s.tcp_abort(conn, now)
        for port in list(listeners[name]):
            s.close_listener(listeners[name].pop(port), now)
    for _ in range(2000):
        pump()
        ts = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
        if not ts:
            break
        now = max(now, min(ts))
        for st in (a, b):
            if (t := st.get_timer()) is not None and t <= now:
                st.handle_timer(now)
    for st in (a, b):
        check_invariants(st)
        assert not st.connections and st._half_open == 0 and not st._deadline_of
