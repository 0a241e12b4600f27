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

_new = object.__new__
_set_peer = PacketReceived.__dict__["peer"].__set__
_set_packet = PacketReceived.__dict__["packet"].__set__


def packet_received(peer: NodePublic, packet: bytes) -> PacketReceived:
    """``PacketReceived(peer, packet)`` built directly through its slots.

    Equal to the normal constructor's result, but ~40% cheaper than the frozen
    dataclass ``__init__``; used on the per-packet receive path.
    """
    event = _new(PacketReceived)
    _set_peer(event, peer)
    _set_packet(event, packet)
    return event
