"""WireGuard (Noise_IKpsk2) as a sans-IO protocol core.

``WireGuard`` (tsnet.wg.device) is the entry point; drivers do the I/O.
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
