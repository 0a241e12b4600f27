"""A peer relay endpoint brought to the open state in memory, for relay driver tests and benchmarks."""

from __future__ import annotations

from tsnet.key import DiscoPrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.client import RelayBindHandshake
from tsnet.relay.server import RelayServer


def bound_relay_pair(
    relay: AddrPort, a_addr: AddrPort, b_addr: AddrPort, now: float
) -> tuple[RelayServer, d.UDPRelayEndpoint, RelayBindHandshake, RelayBindHandshake]:
    """A relay server at ``relay`` with one endpoint that clients at ``a_addr`` and ``b_addr`` have bound.

    The bind handshakes run through the sans-IO cores directly (no sockets); returns the server,
    the endpoint and both clients' finished handshakes (for ``wrap_wireguard``).
    """
    srv = RelayServer(DiscoPrivate.generate(), now=now)
    srv.set_addr_ports(static=[relay])
    a, b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())
    ep = srv.allocate(a.public_key, b.public_key, now)
    hs = {a_addr: RelayBindHandshake(a, ep, 1), b_addr: RelayBindHandshake(b, ep, 1)}
    for src, h in hs.items():
        queue = [(dg.data, src, dg.to) for dg in h.start(now)]
        while queue:
            data, s, dst = queue.pop()
            if dst == relay:
                out = srv.receive_datagram(data, s, now)
                if out:
                    queue.append((bytes(out[0]), relay, out[1]))
            elif dst in hs:
                queue += [(dg.data, dst, dg.to) for dg in hs[dst].receive_datagram(data, s, now)]
    assert srv.endpoint_gauge()["open"] == 1
    return srv, ep, hs[a_addr], hs[b_addr]
