"""Disco: Tailscale's small encrypted discovery protocol (tailscaled 1.96.4 wire format).

Outer packet (identical over UDP, inside Geneve, and inside a DERP frame)::

    magic "TS\\xf0\\x9f\\x92\\xac" (6) | sender disco public key (32) | nonce (24) | tag (16) | ciphertext

The box is classic NaCl ``crypto_box`` (Curve25519 + XSalsa20-Poly1305) keyed by
the sender's disco private key and the recipient's disco public key; PyNaCl's
``Box.encrypt`` output is exactly ``nonce | tag | ciphertext``.

Plaintext: ``type (1) | version (1) | payload``. Message classes here are frozen
dataclasses; :func:`parse_message` turns plaintext into one and every message
has ``to_bytes()``. Malformed input raises :class:`DiscoParseError` (a
``ValueError``), never anything else.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Union

import nacl.exceptions
import nacl.public

from tsnet.key import KEY_LEN, DiscoPrivate, DiscoPublic, NodePublic
from tsnet.magicsock.addrport import ADDRPORT_WIRE_LEN, AddrPort

__all__ = [
    "MAGIC",
    "NONCE_LEN",
    "HEADER_LEN",
    "MIN_PACKET_LEN",
    "TX_ID_LEN",
    "MessageType",
    "DiscoError",
    "DiscoParseError",
    "DiscoOpenError",
    "Ping",
    "Pong",
    "CallMeMaybe",
    "BindUDPRelayEndpoint",
    "BindUDPRelayEndpointChallenge",
    "BindUDPRelayEndpointAnswer",
    "UDPRelayEndpoint",
    "CallMeMaybeVia",
    "AllocateUDPRelayEndpointRequest",
    "AllocateUDPRelayEndpointResponse",
    "IgnoredMessage",
    "Message",
    "parse_message",
    "looks_like_disco",
    "sender_key",
    "DiscoBoxes",
    "new_tx_id",
]

MAGIC = "TS\U0001f4ac".encode()  # 54 53 f0 9f 92 ac
assert len(MAGIC) == 6
NONCE_LEN = 24
TAG_LEN = 16
#: magic + sender key: enough for magicsock's "looks like disco" test.
HEADER_LEN = len(MAGIC) + KEY_LEN
#: smallest packet that can hold a box (``disco.LooksLikeDiscoWrapper``).
MIN_PACKET_LEN = HEADER_LEN + NONCE_LEN
MSG_HEADER_LEN = 2
TX_ID_LEN = 12
CHALLENGE_LEN = 32
NS_PER_SECOND = 1_000_000_000


class MessageType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03
    BIND_UDP_RELAY_ENDPOINT = 0x04
    BIND_UDP_RELAY_ENDPOINT_CHALLENGE = 0x05
    BIND_UDP_RELAY_ENDPOINT_ANSWER = 0x06
    CALL_ME_MAYBE_VIA = 0x07
    ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST = 0x08
    ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE = 0x09


class DiscoError(ValueError):
    """Base class for every disco decode/open failure."""


class DiscoParseError(DiscoError):
    """The plaintext (or outer framing) is malformed or of an unknown type."""


class DiscoOpenError(DiscoError):
    """The NaCl box did not authenticate (wrong key, tampering, truncation)."""


def new_tx_id() -> bytes:
    """A fresh random 12-byte transaction id."""
    return os.urandom(TX_ID_LEN)


def _header(t: MessageType) -> bytes:
    return bytes((t, 0))


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


# --- direct path messages -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Disco ping. ``node_key`` is the sender's WireGuard key (None = omitted, as
    pre-1.16 clients did); ``padding`` zero bytes follow for path-MTU probes."""

    tx_id: bytes
    node_key: NodePublic | None = None
    padding: int = 0
    TYPE: ClassVar[MessageType] = MessageType.PING

    def __post_init__(self) -> None:
        _check_len("tx_id", self.tx_id, TX_ID_LEN)
        if self.padding < 0:
            raise ValueError("padding must be >= 0")

    def to_bytes(self) -> bytes:
        # A zero node key is written as absent, like tailscaled.
        key = b"" if self.node_key is None or self.node_key.is_zero() else self.node_key.raw
        return _header(self.TYPE) + self.tx_id + key + bytes(self.padding)

    @classmethod
    def parse(cls, version: int, p: memoryview) -> Ping:
        if len(p) < TX_ID_LEN:
            raise DiscoParseError(f"ping: {len(p)} payload bytes, need >= {TX_ID_LEN}")
        rest = len(p) - TX_ID_LEN
        if rest >= KEY_LEN:
            return cls(bytes(p[:TX_ID_LEN]), NodePublic(bytes(p[TX_ID_LEN:TX_ID_LEN + KEY_LEN])), rest - KEY_LEN)
        return cls(bytes(p[:TX_ID_LEN]), None, rest)


PONG_LEN = TX_ID_LEN + ADDRPORT_WIRE_LEN


@dataclass(frozen=True, slots=True)
class Pong:
    """Reply to a ping: echoes ``tx_id`` and reports the source the ping came from."""

    tx_id: bytes
    src: AddrPort
    TYPE: ClassVar[MessageType] = MessageType.PONG

    def __post_init__(self) -> None:
        _check_len("tx_id", self.tx_id, TX_ID_LEN)

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + self.tx_id + self.src.to_wire()

    @classmethod
    def parse(cls, version: int, p: memoryview) -> Pong:
        if len(p) < PONG_LEN:
            raise DiscoParseError(f"pong: {len(p)} payload bytes, need >= {PONG_LEN}")
        return cls(bytes(p[:TX_ID_LEN]), AddrPort.from_wire(p[TX_ID_LEN:PONG_LEN]))


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """Sent over DERP: "I just pinged you from these endpoints, ping me back".

    An empty list is meaningful: the receiver forgets all CMM-learned endpoints.
    """

    endpoints: tuple[AddrPort, ...] = ()
    TYPE: ClassVar[MessageType] = MessageType.CALL_ME_MAYBE

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + b"".join(ep.to_wire() for ep in self.endpoints)

    @classmethod
    def parse(cls, version: int, p: memoryview) -> CallMeMaybe:
        # tailscaled: wrong version, empty or ragged body -> valid message, empty list.
        if version != 0 or len(p) == 0 or len(p) % ADDRPORT_WIRE_LEN:
            return cls(())
        return cls(tuple(AddrPort.from_wire(p[i:i + ADDRPORT_WIRE_LEN]) for i in range(0, len(p), ADDRPORT_WIRE_LEN)))


# --- relay handshake messages ---------------------------------------------

_BIND = struct.Struct("!II32s32s")
BIND_LEN = _BIND.size  # 72


@dataclass(frozen=True, slots=True)
class _BindCommon:
    vni: int
    generation: int
    remote_key: DiscoPublic
    challenge: bytes = bytes(CHALLENGE_LEN)
    TYPE: ClassVar[MessageType]

    def __post_init__(self) -> None:
        _check_len("challenge", self.challenge, CHALLENGE_LEN)
        if not 0 <= self.vni <= 0xFFFFFFFF or not 0 <= self.generation <= 0xFFFFFFFF:
            raise ValueError("vni and generation are u32")

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + _BIND.pack(self.vni, self.generation, self.remote_key.raw, self.challenge)

    @classmethod
    def parse(cls, version: int, p: memoryview):  # type: ignore[no-untyped-def]
        if len(p) < BIND_LEN:
            raise DiscoParseError(f"{cls.__name__}: {len(p)} payload bytes, need >= {BIND_LEN}")
        vni, gen, remote, challenge = _BIND.unpack_from(p)
        return cls(vni, gen, DiscoPublic(remote), challenge)


@dataclass(frozen=True, slots=True)
class BindUDPRelayEndpoint(_BindCommon):
    """Client -> relay server: start binding my side of endpoint ``vni``."""

    TYPE: ClassVar[MessageType] = MessageType.BIND_UDP_RELAY_ENDPOINT


@dataclass(frozen=True, slots=True)
class BindUDPRelayEndpointChallenge(_BindCommon):
    """Relay server -> client: prove you own this source address (echo ``challenge``)."""

    TYPE: ClassVar[MessageType] = MessageType.BIND_UDP_RELAY_ENDPOINT_CHALLENGE


@dataclass(frozen=True, slots=True)
class BindUDPRelayEndpointAnswer(_BindCommon):
    """Client -> relay server: the echoed challenge; completes the bind."""

    TYPE: ClassVar[MessageType] = MessageType.BIND_UDP_RELAY_ENDPOINT_ANSWER


_RELAY_EP = struct.Struct("!32s32s32sQIqq")
RELAY_ENDPOINT_FIXED_LEN = _RELAY_EP.size  # 124


@dataclass(frozen=True, slots=True)
class UDPRelayEndpoint:
    """A relay server's allocation (Go ``udprelay/endpoint.ServerEndpoint``).

    Lifetimes are kept as integer nanoseconds, the wire unit (Go ``time.Duration``).
    """

    server_disco: DiscoPublic
    client_disco: tuple[DiscoPublic, DiscoPublic]
    lamport_id: int
    vni: int
    bind_lifetime_ns: int
    steady_state_lifetime_ns: int
    addr_ports: tuple[AddrPort, ...]

    def __post_init__(self) -> None:
        if len(self.client_disco) != 2:
            raise ValueError("client_disco must hold two keys")
        if not self.addr_ports:
            raise ValueError("a relay endpoint needs at least one addr:port")

    @property
    def bind_lifetime(self) -> float:
        return self.bind_lifetime_ns / NS_PER_SECOND

    @property
    def steady_state_lifetime(self) -> float:
        return self.steady_state_lifetime_ns / NS_PER_SECOND

    def encode(self) -> bytes:
        fixed = _RELAY_EP.pack(
            self.server_disco.raw,
            self.client_disco[0].raw,
            self.client_disco[1].raw,
            self.lamport_id,
            self.vni,
            self.bind_lifetime_ns,
            self.steady_state_lifetime_ns,
        )
        return fixed + b"".join(ap.to_wire() for ap in self.addr_ports)

    @classmethod
    def decode(cls, p: memoryview) -> UDPRelayEndpoint:
        n = len(p) - RELAY_ENDPOINT_FIXED_LEN
        if n < ADDRPORT_WIRE_LEN or n % ADDRPORT_WIRE_LEN:
            raise DiscoParseError(f"relay endpoint: bad length {len(p)}")
        sd, c0, c1, lamport, vni, bind_ns, steady_ns = _RELAY_EP.unpack_from(p)
        aps = tuple(
            AddrPort.from_wire(p[i:i + ADDRPORT_WIRE_LEN])
            for i in range(RELAY_ENDPOINT_FIXED_LEN, len(p), ADDRPORT_WIRE_LEN)
        )
        return cls(DiscoPublic(sd), (DiscoPublic(c0), DiscoPublic(c1)), lamport, vni, bind_ns, steady_ns, aps)


@dataclass(frozen=True, slots=True)
class CallMeMaybeVia:
    """Sent over DERP to the other client: "meet me at this relay endpoint"."""

    endpoint: UDPRelayEndpoint
    TYPE: ClassVar[MessageType] = MessageType.CALL_ME_MAYBE_VIA

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + self.endpoint.encode()

    @classmethod
    def parse(cls, version: int, p: memoryview) -> CallMeMaybeVia | IgnoredMessage:
        if version != 0:
            return IgnoredMessage(cls.TYPE, version)
        return cls(UDPRelayEndpoint.decode(p))


_ALLOC_REQ = struct.Struct("!32s32sI")
ALLOC_REQUEST_LEN = _ALLOC_REQ.size  # 68


@dataclass(frozen=True, slots=True)
class AllocateUDPRelayEndpointRequest:
    """Client -> relay node over DERP: allocate an endpoint for this disco key pair."""

    client_disco: tuple[DiscoPublic, DiscoPublic]
    generation: int
    TYPE: ClassVar[MessageType] = MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + _ALLOC_REQ.pack(self.client_disco[0].raw, self.client_disco[1].raw, self.generation)

    @classmethod
    def parse(cls, version: int, p: memoryview) -> AllocateUDPRelayEndpointRequest | IgnoredMessage:
        if version != 0:
            return IgnoredMessage(cls.TYPE, version)
        if len(p) < ALLOC_REQUEST_LEN:
            raise DiscoParseError(f"allocate request: {len(p)} payload bytes, need >= {ALLOC_REQUEST_LEN}")
        a, b, gen = _ALLOC_REQ.unpack_from(p)
        return cls((DiscoPublic(a), DiscoPublic(b)), gen)


@dataclass(frozen=True, slots=True)
class AllocateUDPRelayEndpointResponse:
    """Relay node -> client over DERP: the allocation, echoing the request's generation."""

    generation: int
    endpoint: UDPRelayEndpoint
    TYPE: ClassVar[MessageType] = MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE

    def to_bytes(self) -> bytes:
        return _header(self.TYPE) + struct.pack("!I", self.generation) + self.endpoint.encode()

    @classmethod
    def parse(cls, version: int, p: memoryview) -> AllocateUDPRelayEndpointResponse | IgnoredMessage:
        if version != 0:
            return IgnoredMessage(cls.TYPE, version)
        if len(p) < 4:
            raise DiscoParseError("allocate response: too short")
        return cls(struct.unpack_from("!I", p)[0], UDPRelayEndpoint.decode(p[4:]))


@dataclass(frozen=True, slots=True)
class IgnoredMessage:
    """A known type with a version tailscaled parses as an empty message; act on nothing."""

    type: MessageType
    version: int


Message = Union[
    Ping,
    Pong,
    CallMeMaybe,
    BindUDPRelayEndpoint,
    BindUDPRelayEndpointChallenge,
    BindUDPRelayEndpointAnswer,
    CallMeMaybeVia,
    AllocateUDPRelayEndpointRequest,
    AllocateUDPRelayEndpointResponse,
    IgnoredMessage,
]

_PARSERS = {
    cls.TYPE: cls.parse
    for cls in (
        Ping,
        Pong,
        CallMeMaybe,
        BindUDPRelayEndpoint,
        BindUDPRelayEndpointChallenge,
        BindUDPRelayEndpointAnswer,
        CallMeMaybeVia,
        AllocateUDPRelayEndpointRequest,
        AllocateUDPRelayEndpointResponse,
    )
}


def parse_message(plaintext: bytes | memoryview) -> Message:
    """Decode a disco plaintext (type, version, payload). Raises DiscoParseError."""
    p = memoryview(plaintext)
    if len(p) < MSG_HEADER_LEN:
        raise DiscoParseError("disco message shorter than its 2-byte header")
    parser = _PARSERS.get(p[0])  # type: ignore[call-overload]
    if parser is None:
        raise DiscoParseError(f"unknown disco message type {p[0]:#04x}")
    return parser(p[1], p[MSG_HEADER_LEN:])  # type: ignore[no-any-return]


# --- outer packet ------------------------------------------------------------


def looks_like_disco(data: bytes | memoryview) -> bool:
    """magicsock's test: at least magic + sender key, starting with the magic."""
    return len(data) >= HEADER_LEN and data[: len(MAGIC)] == MAGIC


def sender_key(data: bytes | memoryview) -> DiscoPublic:
    """The sender disco key of an outer packet. Raises DiscoParseError if it is not disco."""
    if not looks_like_disco(data):
        raise DiscoParseError("not a disco packet")
    return DiscoPublic(bytes(data[len(MAGIC):HEADER_LEN]))


@dataclass(slots=True)
class DiscoBoxes:
    """Seals and opens disco packets for one local disco key.

    Precomputed NaCl boxes (the X25519 shared key) are cached per peer key,
    least-recently-used first out once ``max_peers`` is exceeded.
    """

    private: DiscoPrivate
    max_peers: int = 4096
    _nacl_private: nacl.public.PrivateKey = field(init=False, repr=False)
    _boxes: OrderedDict[bytes, nacl.public.Box] = field(init=False, repr=False, default_factory=OrderedDict)
    _public: DiscoPublic = field(init=False, repr=False)
    _prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._nacl_private = nacl.public.PrivateKey(self.private.raw)
        # Deriving the public key is a scalar multiplication: do it once.
        self._public = self.private.public
        self._prefix = MAGIC + self._public.raw

    @property
    def public_key(self) -> DiscoPublic:
        return self._public

    def box_for(self, peer: DiscoPublic) -> nacl.public.Box:
        """The cached precomputed box with ``peer``. Raises DiscoError for an invalid key."""
        raw = peer.raw
        box = self._boxes.get(raw)
        if box is not None:
            self._boxes.move_to_end(raw)
            return box
        try:
            box = nacl.public.Box(self._nacl_private, nacl.public.PublicKey(raw))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise DiscoError(f"unusable disco peer key {peer.short()}: {exc}") from None
        self._boxes[raw] = box
        if len(self._boxes) > self.max_peers:
            self._boxes.popitem(last=False)
        return box

    def forget(self, peer: DiscoPublic) -> None:
        self._boxes.pop(peer.raw, None)

    def retain(self, peers: Iterable[DiscoPublic]) -> None:
        """Drop cached boxes for every key not in ``peers`` (e.g. after a netmap update)."""
        keep = {p.raw for p in peers}
        for raw in [raw for raw in self._boxes if raw not in keep]:
            del self._boxes[raw]

    def seal(self, peer: DiscoPublic, message: Message | bytes, nonce: bytes | None = None) -> bytes:
        """A complete outer disco packet carrying ``message`` to ``peer``.

        ``nonce`` is for tests only; by default a fresh random nonce is used.
        """
        plaintext = message if isinstance(message, (bytes, bytearray)) else message.to_bytes()
        if nonce is None:
            nonce = os.urandom(NONCE_LEN)
        sealed = self.box_for(peer).encrypt(bytes(plaintext), nonce)
        return self._prefix + bytes(sealed)

    def open(self, data: bytes | memoryview) -> tuple[DiscoPublic, bytes]:
        """Authenticate and decrypt; returns (sender, plaintext). Raises DiscoError."""
        sender = sender_key(data)
        if len(data) < MIN_PACKET_LEN + TAG_LEN:
            raise DiscoParseError(f"disco packet of {len(data)} bytes is too short for a box")
        box = self.box_for(sender)
        try:
            plaintext = box.decrypt(bytes(data[HEADER_LEN:]))
        except nacl.exceptions.CryptoError:
            raise DiscoOpenError(f"disco box from {sender.short()} did not open") from None
        return sender, plaintext

    def open_message(self, data: bytes | memoryview) -> tuple[DiscoPublic, Message]:
        """:meth:`open` then :func:`parse_message`. Raises DiscoError."""
        sender, plaintext = self.open(data)
        return sender, parse_message(plaintext)
