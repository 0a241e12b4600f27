"""Events the WireGuard core reports to its driver (``WireGuard.next_event``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tsnet.key import NodePublic

__all__ = [
    "Event",
    "HandshakeCompleted",
    "HandshakeFailed",
    "PacketReceived",
    "PeerEndpointChanged",
]


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """An authenticated inner IP packet from ``peer``, trimmed to its IP length (padding removed)."""

    peer: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session with ``peer`` is usable. ``initiator`` is True when we sent the initiation."""

    peer: NodePublic
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """We gave up on a handshake with ``peer`` after REKEY_ATTEMPT_TIME; its staged packets were dropped."""

    peer: NodePublic


@dataclass(frozen=True, slots=True)
class PeerEndpointChanged:
    """``peer``'s endpoint roamed to ``endpoint``, the source of its latest authenticated packet."""

    peer: NodePublic
    endpoint: Any


Event = PacketReceived | HandshakeCompleted | HandshakeFailed | PeerEndpointChanged
