"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it: primitives, KDF chain, both handshake roles.

Everything here is pure: ephemeral keys, indices and timestamps are passed
in, so a handshake is reproducible for known-answer tests. mac1/mac2 are
added and checked by ``tsnet.wg.cookie``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsnet.wg.messages import INITIATION, NONCE, RESPONSE, TYPE_INITIATION, TYPE_RESPONSE

__all__ = [
    "C0",
    "CONSTRUCTION",
    "H0",
    "IDENTIFIER",
    "ConsumedInitiation",
    "HandshakeError",
    "InitiatorState",
    "UnknownPeerError",
    "aead_decrypt",
    "aead_encrypt",
    "consume_initiation",
    "consume_response",
    "create_initiation",
    "create_response",
    "derive_transport_keys",
    "dh",
    "hash_",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "tai64n",
]

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
ZERO_PSK = bytes(32)


class HandshakeError(Exception):
    """A handshake message failed to authenticate or decrypt."""


def hash_(*parts: bytes) -> bytes:
    """BLAKE2s-256 of the concatenation of ``parts``."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE2s with a 16-byte output."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    t3 = hmac_blake2s(prk, t2 + b"\x03")
    return t1, t2, t3


C0 = hash_(CONSTRUCTION)
H0 = hash_(C0, IDENTIFIER)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises HandshakeError when the tag does not verify."""
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE.pack(counter), ciphertext, ad)
    except InvalidTag:
        raise HandshakeError("AEAD authentication failed") from None


def dh(private: X25519PrivateKey, public_raw: bytes) -> bytes:
    """X25519; raises HandshakeError on a low-order point (all-zero result)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public_raw))
    except ValueError:
        raise HandshakeError("X25519 produced the all-zero value") from None


_TAI64_EPOCH = 0x400000000000000A
_TAI64N = struct.Struct(">QI")


def tai64n(unix_time: float) -> bytes:
    """TAI64N label for ``unix_time``, nanoseconds rounded down to 2^24 ns as wireguard-go does."""
    seconds = int(unix_time // 1)
    nanos = int((unix_time - seconds) * 1e9)
    nanos = min(nanos, 999_999_999) & ~0xFFFFFF
    return _TAI64N.pack(_TAI64_EPOCH + seconds, nanos)


def public_raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


# -- initiator -----------------------------------------------------------------


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending type 1 and consuming type 2."""

    local_index: int
    ephemeral: X25519PrivateKey
    chaining_key: bytes
    hash: bytes


def create_initiation(
    *,
    static: X25519PrivateKey,
    static_public: bytes,
    remote_static: bytes,
    ephemeral: X25519PrivateKey,
    sender_index: int,
    timestamp: bytes,
    static_static: bytes | None = None,
) -> tuple[bytearray, InitiatorState]:
    """Build a type-1 message (mac1/mac2 left zero) and the state needed for the response.

    ``static_static`` is DH(static, remote_static), precomputed per peer; computed when None.
    """
    c = C0
    h = hash_(H0, remote_static)
    e_pub = public_raw(ephemeral)
    c = kdf1(c, e_pub)
    h = hash_(h, e_pub)
    c, k = kdf2(c, dh(ephemeral, remote_static))
    enc_static = aead_encrypt(k, 0, static_public, h)
    h = hash_(h, enc_static)
    if static_static is None:
        static_static = dh(static, remote_static)
    c, k = kdf2(c, static_static)
    enc_timestamp = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, enc_timestamp)
    msg = bytearray(INITIATION.size)
    INITIATION.pack_into(msg, 0, TYPE_INITIATION, sender_index, e_pub, enc_static, enc_timestamp, bytes(16), bytes(16))
    return msg, InitiatorState(sender_index, ephemeral, c, h)


def consume_response(
    state: InitiatorState,
    msg: bytes | bytearray | memoryview,
    *,
    static: X25519PrivateKey,
    preshared_key: bytes = ZERO_PSK,
) -> bytes:
    """Verify a type-2 message (size/type/index already checked) and return the final chaining key.

    Raises HandshakeError on any failure.
    """
    _type, _sender, _receiver, e_pub, enc_empty, _m1, _m2 = RESPONSE.unpack_from(msg)
    c = state.chaining_key
    h = hash_(state.hash, e_pub)
    c = kdf1(c, e_pub)
    c = kdf1(c, dh(state.ephemeral, e_pub))
    c = kdf1(c, dh(static, e_pub))
    c, tau, k = kdf3(c, preshared_key)
    h = hash_(h, tau)
    aead_decrypt(k, 0, enc_empty, h)
    return c


# -- responder -----------------------------------------------------------------


@dataclass(slots=True)
class ConsumedInitiation:
    """A verified initiation: who sent it and the Noise state to answer it."""

    remote_static: bytes
    sender_index: int
    remote_ephemeral: bytes
    timestamp: bytes
    chaining_key: bytes
    hash: bytes


def decrypt_initiation_static(
    msg: bytes | bytearray | memoryview, *, static: X25519PrivateKey, static_public: bytes
) -> tuple[bytes, bytes, bytes]:
    """First half of consuming type 1: returns (initiator's static public key, chaining key, hash)."""
    _type, _sender, e_pub, enc_static, _ts, _m1, _m2 = INITIATION.unpack_from(msg)
    c = C0
    h = hash_(H0, static_public)
    c = kdf1(c, e_pub)
    h = hash_(h, e_pub)
    c, k = kdf2(c, dh(static, e_pub))
    remote_static = aead_decrypt(k, 0, enc_static, h)
    h = hash_(h, enc_static)
    return remote_static, c, h


class UnknownPeerError(HandshakeError):
    """The initiation decrypted to a static key the caller does not accept."""


def consume_initiation(
    msg: bytes | bytearray | memoryview,
    *,
    static: X25519PrivateKey,
    static_public: bytes,
    static_static: Callable[[bytes], bytes | None],
) -> ConsumedInitiation:
    """Verify a type-1 message (size/type/mac1 already checked).

    After the initiator's static key is decrypted, ``static_static(key)`` must
    return the precomputed DH(our static, key) for a known peer, or None to
    reject it (raises UnknownPeerError) before any further work.
    Raises HandshakeError on any failure.
    """
    _type, sender, e_pub, _enc_static, enc_timestamp, _m1, _m2 = INITIATION.unpack_from(msg)
    remote_static, c, h = decrypt_initiation_static(msg, static=static, static_public=static_public)
    ss = static_static(remote_static)
    if ss is None:
        raise UnknownPeerError("initiation from an unknown static key")
    c, k = kdf2(c, ss)
    timestamp = aead_decrypt(k, 0, enc_timestamp, h)
    h = hash_(h, enc_timestamp)
    return ConsumedInitiation(remote_static, sender, e_pub, timestamp, c, h)


def create_response(
    init: ConsumedInitiation,
    *,
    ephemeral: X25519PrivateKey,
    sender_index: int,
    preshared_key: bytes = ZERO_PSK,
) -> tuple[bytearray, bytes]:
    """Build a type-2 message (mac1/mac2 left zero); returns it and the final chaining key."""
    e_pub = public_raw(ephemeral)
    h = hash_(init.hash, e_pub)
    c = kdf1(init.chaining_key, e_pub)
    c = kdf1(c, dh(ephemeral, init.remote_ephemeral))
    c = kdf1(c, dh(ephemeral, init.remote_static))
    c, tau, k = kdf3(c, preshared_key)
    h = hash_(h, tau)
    enc_empty = aead_encrypt(k, 0, b"", h)
    msg = bytearray(RESPONSE.size)
    RESPONSE.pack_into(msg, 0, TYPE_RESPONSE, sender_index, init.sender_index, e_pub, enc_empty, bytes(16), bytes(16))
    return msg, c


def derive_transport_keys(chaining_key: bytes) -> tuple[bytes, bytes]:
    """(T1, T2) = KDF2(C, empty): initiator sends with T1, responder with T2."""
    return kdf2(chaining_key, b"")
