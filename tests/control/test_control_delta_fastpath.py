"""Server deltas: sessions synced to the previous view diff only what it changed; lagging sessions
diff everything. Either way, a client applying the deltas ends up with the same peers as a fresh
full netmap."""

import json
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.control import tailcfg
from tsnet.control.netmap import MapSession
from tsnet.control.server import ControlServer, ServerConfig, _Session
from tsnet.control.store import Store
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate

WATCHERS = 3  # nodes 1..3 hold map sessions


def _add_node(store: Store, server: ControlServer, user_id: int, name: str) -> int:
    n = store.create_node(server.now(), machine_key=str(MachinePrivate.generate().public),
                          node_key=str(NodePrivate.generate().public), name=name, user_id=user_id, ephemeral=False,
                          tags=(), key_expiry=None, hostinfo={"Hostname": name, "OS": "linux"}, authkey_id=None)
    store.update_node(n.id, disco_key=str(DiscoPrivate.generate().public), endpoints=("192.0.2.1:1",), cap=133)
    return n.id


def _decode(msg: dict) -> tailcfg.MapResponse:
    return tailcfg.decode(tailcfg.MapResponse, json.dumps(msg).encode())


def _summary(nm) -> dict:
    return {p.id: (p.endpoints, p.online, str(p.key)) for p in nm.peers}


ops = st.lists(st.one_of(
    st.tuples(st.just("endpoint"), st.integers(1, 8), st.integers(1, 65535)),
    st.tuples(st.just("online"), st.integers(4, 8)),
    st.tuples(st.just("delete"), st.integers(4, 8)),
    st.tuples(st.just("add")),
    st.tuples(st.just("sync"), st.integers(1, WATCHERS)),
), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_incremental_deltas_match_a_fresh_netmap(steps):
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            server = ControlServer(store, ServerConfig())
            user = store.ensure_user("u@x", "u", server.now())
            for i in range(8):
                _add_node(store, server, user.id, f"n{i}")
            sessions, clients = {}, {}
            for node_id in range(1, WATCHERS + 1):
                sessions[node_id] = server.sessions[node_id] = _Session(node_id)
            for node_id, session in sessions.items():
                clients[node_id] = MapSession()
                clients[node_id].apply(_decode(server._session_delta(session, first=True)), server.now())

            def sync(node_id: int) -> None:
                msg = server._session_delta(sessions[node_id], first=False)
                if msg is not None:
                    clients[node_id].apply(_decode(msg), server.now())

            fake_online = {}
            for step in steps:
                if step[0] == "endpoint" and store.node(step[1]) is not None:
                    store.update_node(step[1], endpoints=(f"192.0.2.2:{step[2]}",))
                elif step[0] == "online" and store.node(step[1]) is not None:
                    if step[1] in fake_online:
                        del server.sessions[step[1]], fake_online[step[1]]
                    else:
                        fake_online[step[1]] = server.sessions[step[1]] = _Session(step[1])
                elif step[0] == "delete" and store.node(step[1]) is not None:
                    store.delete_node(step[1])
                    if fake_online.pop(step[1], None) is not None:
                        del server.sessions[step[1]]
                elif step[0] == "add":
                    _add_node(store, server, user.id, f"x{len(store.nodes())}")
                elif step[0] == "sync":
                    sync(step[1])
                    continue
                server.notify()
            for node_id in sessions:
                sync(node_id)
                fresh = MapSession().apply(_decode(server._session_delta(_Session(node_id), first=True)),
                                           server.now())
                assert _summary(clients[node_id].snapshot()) == _summary(fresh)
        finally:
            store.close()
