"""Client side of a peer-relay bind handshake (sans-IO), as tailscaled's relay manager runs it.

One :class:`RelayBindHandshake` per (relay endpoint, generation):

* :meth:`start` sends ``Bind`` (Geneve control, disco boxed to the server key)
  to every advertised server addr:port at once. Binds are not retransmitted.
* The **first** valid ``Challenge`` (VNI and remote key checked) fixes the relay
  address; the handshake answers it and immediately sends a ping to the peer
  through the relay (Geneve, not control, boxed to the peer's disco key).
* A relayed ping from the peer is answered with a pong and, while handshaking
  and if it came from that relay address, with one more ping of our own (at
  most 10 pings per handshake).
* The first pong matching one of our pings, from the relay address whose
  challenge we answered, completes the handshake with :class:`RelayPathReady`
  (relay addr:port, VNI, server key, latency). Pings and pongs from any other
  address never draw our pings nor become the path.
* The handshake gives up after min(bind lifetime, 30 s): :class:`RelayHandshakeFailed`.

Allocation (:class:`RelayAllocation`): the request goes over DERP to the relay
node (boxed with the node's disco key); it is re-sent once after 3 s and
abandoned after 10 s; the response is matched by DERP source node key, the
sorted disco pair and the generation. :class:`EndpointDeduper` applies the
Lamport-id rule to endpoints learned from responses and CallMeMaybeVia.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tsnet.key import DiscoPublic, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.demux import PacketKind, classify
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header

__all__ = [
    "MAX_HANDSHAKE_LIFETIME",
    "MAX_HANDSHAKE_PINGS",
    "Datagram",
    "RelayPathReady",
    "RelayHandshakeFailed",
    "HandshakeState",
    "RelayBindHandshake",
    "allocate_request",
    "sorted_pair",
    "ALLOCATE_RETRY_AFTER",
    "ALLOCATE_TIMEOUT",
    "AllocationState",
    "RelayAllocation",
    "EndpointDeduper",
]

ALLOCATE_RETRY_AFTER = 3.0
ALLOCATE_TIMEOUT = 10.0

MAX_HANDSHAKE_LIFETIME = 30.0
MAX_HANDSHAKE_PINGS = 10


@dataclass(frozen=True, slots=True)
class Datagram:
    """A UDP datagram to send."""

    data: bytes
    to: AddrPort


@dataclass(frozen=True, slots=True)
class RelayPathReady:
    relay_addr: AddrPort
    vni: int
    server_disco: DiscoPublic
    latency: float


@dataclass(frozen=True, slots=True)
class RelayHandshakeFailed:
    vni: int
    server_disco: DiscoPublic
    reason: str


class HandshakeState(enum.Enum):
    IDLE = "idle"
    BIND_SENT = "bind-sent"
    ANSWER_SENT = "answer-sent"
    DONE = "done"
    FAILED = "failed"


def sorted_pair(a: DiscoPublic, b: DiscoPublic) -> tuple[DiscoPublic, DiscoPublic]:
    """The bytewise-ascending pair relay servers and requests use."""
    return (a, b) if a.raw <= b.raw else (b, a)


def allocate_request(
    me: DiscoPublic, peer: DiscoPublic, generation: int
) -> disco.AllocateUDPRelayEndpointRequest:
    return disco.AllocateUDPRelayEndpointRequest(sorted_pair(me, peer), generation)


@dataclass(slots=True)
class RelayBindHandshake:
    """Bind one side of a relay endpoint and prove the path with a ping/pong to ``peer_disco``.

    ``boxes`` holds our disco key; ``node_key`` goes into our pings.
    """

    boxes: disco.DiscoBoxes
    endpoint: disco.UDPRelayEndpoint
    generation: int
    node_key: NodePublic | None = None
    state: HandshakeState = HandshakeState.IDLE
    relay_addr: AddrPort | None = None
    result: RelayPathReady | RelayHandshakeFailed | None = None
    peer_disco: DiscoPublic = field(init=False)
    _deadline: float = field(init=False, default=0.0)
    _sent_pings: dict[bytes, float] = field(init=False, default_factory=dict)
    _challenge: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if self.generation == 0:
            raise ValueError("handshake generation must be non-zero")
        me = self.boxes.public_key
        a, b = self.endpoint.client_disco
        if me == a:
            self.peer_disco = b
        elif me == b:
            self.peer_disco = a
        else:
            raise ValueError("our disco key is not one of the endpoint's clients")

    @property
    def vni(self) -> int:
        return self.endpoint.vni

    def _control(self, msg: disco.Message) -> bytes:
        return encode_header(PROTOCOL_DISCO, self.vni, control=True) + self.boxes.seal(self.endpoint.server_disco, msg)

    def _to_peer(self, msg: disco.Message) -> bytes:
        return encode_header(PROTOCOL_DISCO, self.vni) + self.boxes.seal(self.peer_disco, msg)

    def wrap_wireguard(self, packet: bytes) -> bytes:
        """A WireGuard message framed for this relay path (Geneve 0x7A12, not control)."""
        return encode_header(PROTOCOL_WIREGUARD, self.vni) + packet

    def start(self, now: float) -> list[Datagram]:
        """Send Bind to every advertised server address."""
        if self.state is not HandshakeState.IDLE:
            return []
        self.state = HandshakeState.BIND_SENT
        self._deadline = now + min(self.endpoint.bind_lifetime, MAX_HANDSHAKE_LIFETIME)
        bind = disco.BindUDPRelayEndpoint(self.vni, self.generation, self.peer_disco)
        return [Datagram(self._control(bind), ap) for ap in self.endpoint.addr_ports]

    def _ping(self, to: AddrPort, now: float) -> list[Datagram]:
        if len(self._sent_pings) >= MAX_HANDSHAKE_PINGS:
            return []
        tx = disco.new_tx_id()
        self._sent_pings[tx] = now
        return [Datagram(self._to_peer(disco.Ping(tx, self.node_key)), to)]

    def receive_datagram(self, data: bytes | memoryview, src: AddrPort, now: float) -> list[Datagram]:
        """Feed a datagram from the relay path; returns what to send. Junk is ignored."""
        c = classify(data)
        if c.kind is not PacketKind.GENEVE_DISCO or c.vni != self.vni:
            return []
        try:
            sender, msg = self.boxes.open_message(c.payload)
        except disco.DiscoError:
            return []
        return self.receive_disco(sender, msg, src, c.control, now)

    def receive_disco(
        self, sender: DiscoPublic, msg: disco.Message, src: AddrPort, control: bool, now: float
    ) -> list[Datagram]:
        """Feed an already-opened disco message that arrived Geneve-wrapped with our VNI."""
        if self.state in (HandshakeState.DONE, HandshakeState.FAILED, HandshakeState.IDLE):
            # Pings still get pongs after completion: the peer may be mid-handshake.
            if isinstance(msg, disco.Ping) and not control and sender == self.peer_disco:
                return [Datagram(self._to_peer(disco.Pong(msg.tx_id, src)), src)]
            return []
        if now >= self._deadline:
            self._fail("timeout")
            return []
        if control:
            if sender != self.endpoint.server_disco or not isinstance(msg, disco.BindUDPRelayEndpointChallenge):
                return []
            if msg.vni != self.vni or msg.remote_key != self.peer_disco:
                return []
            if self.state is not HandshakeState.BIND_SENT:
                return []  # first valid challenge wins
            self.state = HandshakeState.ANSWER_SENT
            self.relay_addr = src
            self._challenge = msg.challenge
            answer = disco.BindUDPRelayEndpointAnswer(self.vni, self.generation, self.peer_disco, msg.challenge)
            return [Datagram(self._control(answer), src), *self._ping(src, now)]
        if sender != self.peer_disco:
            return []
        # Only the address whose challenge we answered is the relay path: our side is bound there.
        # A ping or pong from anywhere else (another VNI user, a replayed capture) must neither
        # draw our pings nor become the path.
        from_relay = src == self.relay_addr
        if isinstance(msg, disco.Ping):
            out = [Datagram(self._to_peer(disco.Pong(msg.tx_id, src)), src)]
            if self.state is HandshakeState.ANSWER_SENT and from_relay:
                out += self._ping(src, now)
            return out
        if isinstance(msg, disco.Pong):
            sent_at = self._sent_pings.get(msg.tx_id)
            if sent_at is None or not from_relay:
                return []
            self.state = HandshakeState.DONE
            self.result = RelayPathReady(src, self.vni, self.endpoint.server_disco, now - sent_at)
        return []

    def wants_pong(self, tx_id: bytes) -> bool:
        """Whether a pong with ``tx_id`` answers one of this handshake's pings."""
        return tx_id in self._sent_pings

    def get_timer(self) -> float | None:
        if self.state in (HandshakeState.BIND_SENT, HandshakeState.ANSWER_SENT):
            return self._deadline
        return None

    def handle_timer(self, now: float) -> None:
        if self.state in (HandshakeState.BIND_SENT, HandshakeState.ANSWER_SENT) and now >= self._deadline:
            self._fail("timeout")

    def _fail(self, reason: str) -> None:
        self.state = HandshakeState.FAILED
        self.result = RelayHandshakeFailed(self.vni, self.endpoint.server_disco, reason)


class AllocationState(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class RelayAllocation:
    """One allocation request to the relay node ``server_node`` for the pair (us, peer).

    :meth:`start` and :meth:`handle_timer` return the request to seal to the
    relay node's disco key and send over DERP (to its home region); feed the
    opened response to :meth:`handle_response`.
    """

    server_node: NodePublic
    my_disco: DiscoPublic
    peer_disco: DiscoPublic
    generation: int
    state: AllocationState = AllocationState.IDLE
    endpoint: disco.UDPRelayEndpoint | None = None
    _started_at: float = 0.0
    _retried: bool = False

    @property
    def request(self) -> disco.AllocateUDPRelayEndpointRequest:
        return allocate_request(self.my_disco, self.peer_disco, self.generation)

    def start(self, now: float) -> disco.AllocateUDPRelayEndpointRequest | None:
        if self.state is not AllocationState.IDLE:
            return None
        self.state = AllocationState.WAITING
        self._started_at = now
        return self.request

    def get_timer(self) -> float | None:
        if self.state is not AllocationState.WAITING:
            return None
        if not self._retried:
            return self._started_at + ALLOCATE_RETRY_AFTER
        return self._started_at + ALLOCATE_TIMEOUT

    def handle_timer(self, now: float) -> disco.AllocateUDPRelayEndpointRequest | None:
        """Returns the request to re-send (once, at 3 s); gives up at 10 s."""
        if self.state is not AllocationState.WAITING:
            return None
        if now - self._started_at >= ALLOCATE_TIMEOUT:
            self.state = AllocationState.FAILED
            return None
        if not self._retried and now - self._started_at >= ALLOCATE_RETRY_AFTER:
            self._retried = True
            return self.request
        return None

    def handle_response(
        self, src_node: NodePublic, response: disco.AllocateUDPRelayEndpointResponse
    ) -> disco.UDPRelayEndpoint | None:
        """The endpoint if ``response`` (over DERP from ``src_node``) answers this request."""
        if self.state is not AllocationState.WAITING or src_node != self.server_node:
            return None
        if response.generation != self.generation:
            return None
        if sorted_pair(*response.endpoint.client_disco) != sorted_pair(self.my_disco, self.peer_disco):
            return None
        self.state = AllocationState.DONE
        self.endpoint = response.endpoint
        return response.endpoint


@dataclass(slots=True)
class EndpointDeduper:
    """Keeps the newest endpoint per (peer disco key, relay server disco key).

    A newer Lamport id from the same server supersedes the older endpoint;
    equal or older ones are duplicates (tailscaled's relay manager rule).
    """

    _latest: dict[tuple[bytes, bytes], int] = field(default_factory=dict)

    def accept(self, peer_disco: DiscoPublic, endpoint: disco.UDPRelayEndpoint) -> bool:
        k = (peer_disco.raw, endpoint.server_disco.raw)
        prev = self._latest.get(k)
        if prev is not None and endpoint.lamport_id <= prev:
            return False
        self._latest[k] = endpoint.lamport_id
        return True

    def forget_server(self, server_disco: DiscoPublic) -> None:
        """Accept this server's current endpoints again (its path was dropped; a rediscovery may hand them back)."""
        for k in [k for k in self._latest if k[1] == server_disco.raw]:
            del self._latest[k]

    def forget(self, peer_disco: DiscoPublic) -> None:
        for k in [k for k in self._latest if k[0] == peer_disco.raw]:
            del self._latest[k]
