"""mac1/mac2 on handshake messages and the cookie-reply mechanism (XChaCha20-Poly1305 via PyNaCl)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError

from tsnet.wg.messages import COOKIE_REPLY, MAC_SIZE, TYPE_COOKIE_REPLY, mac_offsets
from tsnet.wg.noise import hash_, mac

__all__ = ["LABEL_COOKIE", "LABEL_MAC1", "CookieChecker", "CookieGenerator", "xaead_decrypt", "xaead_encrypt"]

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
_ZERO_MAC = bytes(MAC_SIZE)


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except CryptoError:
        return None


class CookieChecker:
    """Our side as the receiver of handshake messages: checks mac1/mac2 and issues cookies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_refresh", "_rng", "_secret", "_secret_time")

    def __init__(self, static_public: bytes, *, rng: Callable[[int], bytes], refresh_time: float) -> None:
        self._mac1_key = hash_(LABEL_MAC1, static_public)
        self._cookie_key = hash_(LABEL_COOKIE, static_public)
        self._rng = rng
        self._refresh = refresh_time
        self._secret = b""
        self._secret_time: float | None = None

    def check_mac1(self, msg: bytes | bytearray | memoryview) -> bool:
        off1, off2 = mac_offsets(len(msg))
        return hmac.compare_digest(mac(self._mac1_key, msg[:off1]), msg[off1:off2])

    def _current_secret(self, now: float) -> bytes:
        if self._secret_time is None or now - self._secret_time > self._refresh:
            self._secret = self._rng(32)
            self._secret_time = now
        return self._secret

    def _cookie(self, source: bytes, now: float) -> bytes:
        return mac(self._current_secret(now), source)

    def check_mac2(self, msg: bytes | bytearray | memoryview, source: bytes, now: float) -> bool:
        """Whether mac2 is MAC(cookie for ``source``, msg up to mac2)."""
        if self._secret_time is None or now - self._secret_time > self._refresh:
            return False  # no live secret: no cookie we issued can be valid
        _off1, off2 = mac_offsets(len(msg))
        expected = mac(mac(self._secret, source), msg[:off2])
        return hmac.compare_digest(expected, msg[off2:])

    def make_reply(self, msg: bytes | bytearray | memoryview, receiver_index: int, source: bytes, now: float) -> bytes:
        """A type-3 reply to handshake message ``msg`` (whose sender index is ``receiver_index``)."""
        off1, off2 = mac_offsets(len(msg))
        nonce = self._rng(24)
        sealed = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now), bytes(msg[off1:off2]))
        return COOKIE_REPLY.pack(TYPE_COOKIE_REPLY, receiver_index, nonce, sealed)


class CookieGenerator:
    """Our side as the sender of handshake messages to one peer: adds mac1/mac2, takes cookie replies."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_time", "_last_mac1", "_mac1_key", "_refresh")

    def __init__(self, peer_static_public: bytes, *, refresh_time: float) -> None:
        self._mac1_key = hash_(LABEL_MAC1, peer_static_public)
        self._cookie_key = hash_(LABEL_COOKIE, peer_static_public)
        self._refresh = refresh_time
        self._cookie = b""
        self._cookie_time: float | None = None
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie_time is not None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill in mac1 and (with a live cookie) mac2 of a handshake message in place."""
        off1, off2 = mac_offsets(len(msg))
        view = memoryview(msg)
        mac1 = mac(self._mac1_key, view[:off1])
        msg[off1:off2] = mac1
        self._last_mac1 = mac1
        if self._cookie_time is not None and now - self._cookie_time <= self._refresh:
            msg[off2:] = mac(self._cookie, view[:off2])
        else:
            msg[off2:] = _ZERO_MAC

    def consume_reply(self, msg: bytes | bytearray | memoryview, now: float) -> bool:
        """Decrypt a type-3 reply with the mac1 we last sent as AD; store the cookie. False if invalid."""
        if self._last_mac1 is None:
            return False
        _type, _receiver, nonce, sealed = COOKIE_REPLY.unpack_from(msg)
        cookie = xaead_decrypt(self._cookie_key, nonce, sealed, self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True
