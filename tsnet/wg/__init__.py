"""WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s) as a sans-IO protocol core.

``WireGuard`` (tsnet.wg.device) is the entry point; a driver does the I/O::

    wg = WireGuard(node_private, now=clock())
    wg.add_peer(peer_public, endpoint=("192.0.2.7", 41641))
    wg.send_packet(peer_public, ip_packet, clock())        # or send_packets(peer, [...], now)
    for payload, addr in wg.datagrams_to_send(clock()):
        sock.sendto(payload, addr)
    wg.receive_datagrams(drained_batch, clock())            # [(payload, addr), ...]; never raises
    for event in wg.drain_events():                         # PacketReceived, HandshakeCompleted, ...
        ...
    deadline = wg.get_timer()                               # sleep until then, then wg.handle_timer(clock())

Modules: ``messages`` (wire layouts), ``noise`` (handshake and KDF), ``cookie``
(mac1/mac2, cookie replies), ``replay`` (sliding window), ``session`` (keypairs
and per-peer state), ``timers`` (deadline queue), ``ratelimit`` (load and
per-host token bucket), ``limits``, ``events``, ``stats``.
"""

from tsnet.wg.device import Addr, WireGuard
from tsnet.wg.events import Event, HandshakeCompleted, HandshakeFailed, PacketReceived, PeerEndpointChanged
from tsnet.wg.limits import Limits
from tsnet.wg.stats import Counters, PeerStatus

__all__ = [
    "Addr",
    "Counters",
    "Event",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Limits",
    "PacketReceived",
    "PeerEndpointChanged",
    "PeerStatus",
    "WireGuard",
]
