"""controlbase: Tailscale's Noise IK transport for the control plane (sans-IO).

The handshake is standard ``Noise_IK_25519_ChaChaPoly_BLAKE2s`` with the prologue
``Tailscale Control Protocol v<version>``. Messages carry small headers (a version
on the initiation, a type byte and a big-endian length on every record), and
transport nonces are encoded **big-endian**, unlike the Noise specification. That
last detail means generic Noise libraries agree with Tailscale on one record per
direction only, so everything here is written out explicitly.

Nothing in this module does I/O: :class:`Initiator` and :func:`respond` turn
handshake bytes into a :class:`NoiseTransport`, which seals plaintext into
records and reassembles received bytes into plaintext.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..key import MachinePrivate, MachinePublic

__all__ = [
    "HandshakeError",
    "Initiator",
    "NoiseError",
    "NoiseTransport",
    "PROTOCOL_NAME",
    "RECORD_TYPE_ERROR",
    "RECORD_TYPE_INITIATION",
    "RECORD_TYPE_RESPONSE",
    "RECORD_TYPE_TRANSPORT",
    "INITIATION_LEN",
    "RESPONSE_LEN",
    "MAX_RECORD_LEN",
    "MAX_PLAINTEXT_LEN",
    "Responded",
    "error_record",
    "prologue",
    "respond",
]

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
RECORD_TYPE_INITIATION = 1
RECORD_TYPE_RESPONSE = 2
RECORD_TYPE_ERROR = 3
RECORD_TYPE_TRANSPORT = 4

_TAG_LEN = 16
_KEY_LEN = 32
INITIATION_PAYLOAD_LEN = _KEY_LEN + (_KEY_LEN + _TAG_LEN) + _TAG_LEN  # e, enc(s), enc("")  = 96
RESPONSE_PAYLOAD_LEN = _KEY_LEN + _TAG_LEN  # e, enc("") = 48
INITIATION_LEN = 5 + INITIATION_PAYLOAD_LEN  # 101
RESPONSE_LEN = 3 + RESPONSE_PAYLOAD_LEN  # 51
MAX_RECORD_LEN = 4096
MAX_CIPHERTEXT_LEN = MAX_RECORD_LEN - 3
MAX_PLAINTEXT_LEN = MAX_CIPHERTEXT_LEN - _TAG_LEN  # 4077
_NONCE_LIMIT = 2**64 - 1  # the all-ones counter is reserved


class NoiseError(Exception):
    """The peer sent something that violates the protocol; the connection must close."""


class HandshakeError(NoiseError):
    """The handshake failed (bad message, bad key, or an error record from the server)."""


def prologue(version: int) -> bytes:
    """The prologue mixed into the handshake for protocol ``version``."""
    return b"Tailscale Control Protocol v" + str(version).encode("ascii")


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = _hmac(chaining_key, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    return out1, out2


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class _SymmetricState:
    """Noise SymmetricState: the running hash ``h``, chaining key ``ck`` and handshake key ``k``."""

    __slots__ = ("h", "ck", "k")

    def __init__(self, version: int, responder_static: bytes) -> None:
        self.h = _hash(PROTOCOL_NAME)  # name is longer than 32 bytes, so it is hashed
        self.ck = self.h
        self.k: bytes | None = None
        self.mix_hash(prologue(version))
        self.mix_hash(responder_static)

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf2(self.ck, ikm)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        ct = ChaCha20Poly1305(self.k).encrypt(_nonce(0), plaintext, self.h)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            pt = ChaCha20Poly1305(self.k).decrypt(_nonce(0), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("handshake message failed authentication") from None
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


def _dh(priv: MachinePrivate, pub: bytes) -> bytes:
    try:
        return priv.exchange(pub)
    except ValueError:
        raise HandshakeError("low-order public key in handshake") from None


def error_record(message: str) -> bytes:
    """An unauthenticated error record (type 3) a server sends instead of a handshake response."""
    body = message.encode("utf-8")[:0xFFFF]
    return struct.pack(">BH", RECORD_TYPE_ERROR, len(body)) + body


class Initiator:
    """Client side of the handshake.

    Build with the machine key, the server's Noise public key and the protocol
    (capability) version; send :attr:`initiation`, then feed the 51-byte response
    to :meth:`finish` to get the transport.
    """

    def __init__(
        self,
        machine_key: MachinePrivate,
        server_key: MachinePublic,
        version: int,
        *,
        ephemeral: MachinePrivate | None = None,
    ) -> None:
        if not 0 <= version <= 0xFFFF:
            raise ValueError("protocol version must fit in 16 bits")
        self.version = version
        self._machine_key = machine_key
        self._server_key = server_key
        self._ephemeral = ephemeral if ephemeral is not None else MachinePrivate.generate()
        st = _SymmetricState(version, server_key.raw)
        e_pub = self._ephemeral.public.raw
        st.mix_hash(e_pub)
        st.mix_key(_dh(self._ephemeral, server_key.raw))
        enc_static = st.encrypt_and_hash(machine_key.public.raw)
        st.mix_key(_dh(machine_key, server_key.raw))
        tag = st.encrypt_and_hash(b"")
        self._state = st
        self.initiation: bytes = (
            struct.pack(">HBH", version, RECORD_TYPE_INITIATION, INITIATION_PAYLOAD_LEN) + e_pub + enc_static + tag
        )
        self._done = False

    def finish(self, response: bytes) -> NoiseTransport:
        """Process the server's response (exactly :data:`RESPONSE_LEN` bytes, or an error record)."""
        if self._done:
            raise HandshakeError("handshake already finished")
        self._done = True
        if len(response) < 3:
            raise HandshakeError("short handshake response")
        rtype, length = struct.unpack_from(">BH", response)
        if rtype == RECORD_TYPE_ERROR:
            text = bytes(response[3 : 3 + length]).decode("utf-8", "replace")
            raise HandshakeError(f"server error: {text!r}")
        if rtype != RECORD_TYPE_RESPONSE:
            raise HandshakeError(f"unexpected handshake record type {rtype}")
        if length != RESPONSE_PAYLOAD_LEN or len(response) != RESPONSE_LEN:
            raise HandshakeError(f"handshake response has length {length}, want {RESPONSE_PAYLOAD_LEN}")
        st = self._state
        re_pub = bytes(response[3:35])
        st.mix_hash(re_pub)
        st.mix_key(_dh(self._ephemeral, re_pub))
        st.mix_key(_dh(self._machine_key, re_pub))
        st.decrypt_and_hash(bytes(response[35:51]))
        k1, k2 = st.split()
        return NoiseTransport(send_key=k1, recv_key=k2, handshake_hash=st.h, peer=self._server_key)


@dataclass(frozen=True, slots=True)
class Responded:
    """Result of :func:`respond`: the bytes to send back and the ready transport."""

    response: bytes
    transport: NoiseTransport
    peer: MachinePublic
    version: int


def parse_initiation_header(initiation: bytes) -> int:
    """Validate an initiation's header and length; return the client's protocol version."""
    if len(initiation) != INITIATION_LEN:
        raise HandshakeError(f"initiation is {len(initiation)} bytes, want {INITIATION_LEN}")
    version, rtype, length = struct.unpack_from(">HBH", initiation)
    if rtype != RECORD_TYPE_INITIATION:
        raise HandshakeError(f"unexpected record type {rtype} in initiation")
    if length != INITIATION_PAYLOAD_LEN:
        raise HandshakeError(f"initiation length field {length}, want {INITIATION_PAYLOAD_LEN}")
    return version


def respond(
    server_key: MachinePrivate, initiation: bytes, *, ephemeral: MachinePrivate | None = None
) -> Responded:
    """Server side: process a 101-byte initiation and produce the response and transport.

    The prologue uses the version the client put in the header. Raises
    :class:`HandshakeError` on any malformed or unauthenticated initiation.
    """
    initiation = bytes(initiation)
    version = parse_initiation_header(initiation)
    st = _SymmetricState(version, server_key.public.raw)
    e_pub = initiation[5:37]
    st.mix_hash(e_pub)
    st.mix_key(_dh(server_key, e_pub))
    machine_raw = st.decrypt_and_hash(initiation[37:85])
    st.mix_key(_dh(server_key, machine_raw))
    st.decrypt_and_hash(initiation[85:101])
    eph = ephemeral if ephemeral is not None else MachinePrivate.generate()
    re_pub = eph.public.raw
    st.mix_hash(re_pub)
    st.mix_key(_dh(eph, e_pub))
    st.mix_key(_dh(eph, machine_raw))
    tag = st.encrypt_and_hash(b"")
    k1, k2 = st.split()
    peer = MachinePublic(machine_raw)
    transport = NoiseTransport(send_key=k2, recv_key=k1, handshake_hash=st.h, peer=peer)
    response = struct.pack(">BH", RECORD_TYPE_RESPONSE, RESPONSE_PAYLOAD_LEN) + re_pub + tag
    return Responded(response=response, transport=transport, peer=peer, version=version)


class NoiseTransport:
    """Transport-phase cipher state for one connection, both directions.

    :meth:`seal` turns plaintext of any length into one or more records;
    :meth:`receive` accepts arbitrary chunks of wire bytes and returns whatever
    plaintext became complete. Any protocol violation raises :class:`NoiseError`
    and leaves the transport unusable.
    """

    __slots__ = ("_send", "_recv", "_send_n", "_recv_n", "_buf", "_broken", "handshake_hash", "peer")

    def __init__(self, *, send_key: bytes, recv_key: bytes, handshake_hash: bytes, peer: MachinePublic) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self._buf = bytearray()
        self._broken = False
        self.handshake_hash = handshake_hash
        self.peer = peer

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``plaintext`` into records (an empty input gives one empty record)."""
        if self._broken:
            raise NoiseError("transport is broken")
        view = memoryview(plaintext)
        out = bytearray()
        pos = 0
        while True:
            chunk = view[pos : pos + MAX_PLAINTEXT_LEN]
            if self._send_n >= _NONCE_LIMIT:
                self._broken = True
                raise NoiseError("send nonce exhausted")
            ct = self._send.encrypt(_nonce(self._send_n), bytes(chunk), None)
            self._send_n += 1
            out += struct.pack(">BH", RECORD_TYPE_TRANSPORT, len(ct))
            out += ct
            pos += len(chunk)
            if pos >= len(view):
                break
        return bytes(out)

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed wire bytes; return the plaintext of every record now complete (possibly b"")."""
        if self._broken:
            raise NoiseError("transport is broken")
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        try:
            while len(buf) - pos >= 3:
                rtype = buf[pos]
                length = (buf[pos + 1] << 8) | buf[pos + 2]
                if rtype != RECORD_TYPE_TRANSPORT:
                    raise NoiseError(f"unexpected record type {rtype} in transport phase")
                if length > MAX_CIPHERTEXT_LEN:
                    raise NoiseError(f"record of {length + 3} bytes exceeds {MAX_RECORD_LEN}")
                if length < _TAG_LEN:
                    raise NoiseError("record shorter than its tag")
                end = pos + 3 + length
                if len(buf) < end:
                    break
                if self._recv_n >= _NONCE_LIMIT:
                    raise NoiseError("receive nonce exhausted")
                try:
                    out += self._recv.decrypt(_nonce(self._recv_n), bytes(buf[pos + 3 : end]), None)
                except InvalidTag:
                    raise NoiseError("record failed authentication") from None
                self._recv_n += 1
                pos = end
        except NoiseError:
            self._broken = True
            raise
        del buf[:pos]
        return bytes(out)

    @property
    def pending(self) -> int:
        """Bytes buffered toward a record not yet complete."""
        return len(self._buf)
