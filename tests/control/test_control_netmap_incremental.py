"""MapSession snapshots are updated incrementally; they must equal a from-scratch build after any deltas."""

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.control import tailcfg as tc
from tsnet.control.netmap import MapSession, MapSessionError, Peer
from tsnet.key import NodePrivate

NOW = dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
KEYS = [NodePrivate.generate().public for _ in range(8)]


def node(i: int, *, keyed: bool = True, port: int = 41641, online: bool = True) -> tc.Node:
    # A peer without a key is unusable: snapshots skip it (it changes the shape of the peer list).
    # (A DERP home, because a peer with neither disco key nor DERP is skipped too.)
    return tc.Node(id=i, stable_id=f"n{i}", name=f"n{i}.tn.test.", user=1, key=KEYS[i] if keyed else None,
                   addresses=(f"100.64.0.{i}/32",), endpoints=(f"192.0.2.1:{port}",), online=online, home_derp=900)


def reference(session: MapSession) -> tuple[Peer, ...]:
    out = []
    for node_id in sorted(session.peers):
        try:
            out.append(Peer.from_node(session.peers[node_id]))
        except MapSessionError:
            continue
    return tuple(out)


ids = st.integers(min_value=1, max_value=7)
ops = st.one_of(
    st.tuples(st.just("remove"), ids),
    st.tuples(st.just("change"), ids, st.booleans(), st.integers(1, 65535)),
    st.tuples(st.just("online"), ids, st.booleans()),
    st.tuples(st.just("patch"), ids, st.integers(1, 65535)),
    st.tuples(st.just("full"), st.sets(ids)),
)


@settings(max_examples=150, deadline=None)
@given(st.sets(ids), st.lists(st.lists(ops, min_size=1, max_size=4), max_size=12))
def test_incremental_snapshot_matches_full_build(initial, messages):
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=tuple(node(i) for i in sorted(initial))), NOW)
    assert nm.peers == reference(s)
    for message in messages:
        removed, changed, online, patches, full = [], [], {}, [], None
        for op in message:
            if op[0] == "remove":
                removed.append(op[1])
            elif op[0] == "change":
                changed.append(node(op[1], keyed=op[2], port=op[3]))
            elif op[0] == "online":
                online[op[1]] = op[2]
            elif op[0] == "patch":
                patches.append(tc.PeerChange(node_id=op[1], endpoints=(f"192.0.2.2:{op[2]}",)))
            else:
                full = tuple(node(i) for i in sorted(op[1]))
        msg = tc.MapResponse(peers=full or None, peers_removed=tuple(removed) or None,
                             peers_changed=tuple(changed) or None, online_change=online or None,
                             peers_changed_patch=tuple(patches) or None)
        nm = s.apply(msg, NOW)
        assert nm is not None and nm.peers == reference(s)
        assert [p.id for p in nm.peers] == sorted(p.id for p in nm.peers)
