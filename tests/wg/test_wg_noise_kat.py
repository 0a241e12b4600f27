"""Known-answer tests: constants, XChaCha20-Poly1305, TAI64N, and a fixed handshake re-derived step by step.

The expected values are computed here from the spec's KDF chain with hashlib/hmac
and the raw primitives, independently of tsnet.wg.noise.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsnet.wg import cookie, noise
from tsnet.wg.messages import INITIATION, RESPONSE

C0_HEX = "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
H0_HEX = "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


# -- an independent reference implementation of the chain ------------------------


def H(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def HMAC(k: bytes, x: bytes) -> bytes:
    return hmac.new(k, x, hashlib.blake2s).digest()


def KDF(n: int, key: bytes, data: bytes) -> list[bytes]:
    prk = HMAC(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = HMAC(prk, prev + bytes([i]))
        out.append(prev)
    return out


def AEAD(k: bytes, counter: int, pt: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(k).encrypt(b"\0\0\0\0" + counter.to_bytes(8, "little"), pt, ad)


def DH(priv: bytes, pub: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def PUB(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw()


def MAC16(k: bytes, x: bytes) -> bytes:
    return hashlib.blake2s(x, digest_size=16, key=k).digest()


# Fixed inputs (private keys are arbitrary 32-byte strings; X25519 clamps internally).
SI = bytes(range(1, 33))
SR = bytes(range(33, 65))
EI = bytes(range(65, 97))
ER = bytes(range(97, 129))
PSK = bytes(32)
TIMESTAMP = bytes.fromhex("400000006553f1000a000000")
I_INDEX = 0x11223344
GOLDEN_SHA256 = "b8343e81a029e06bffa26a5bf9de471507e6409944e48cec54c19fe8d2e6e8db"
R_INDEX = 0x55667788


def test_initial_chaining_key_and_hash() -> None:
    assert noise.C0.hex() == C0_HEX == H(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").hex()
    assert noise.H0.hex() == H0_HEX == H(bytes.fromhex(C0_HEX), b"WireGuard v1 zx2c4 Jason@zx2c4.com").hex()


def test_kdf_matches_hkdf_definition() -> None:
    key, data = b"k" * 32, b"input"
    t1, t2, t3 = KDF(3, key, data)
    assert noise.kdf1(key, data) == t1
    assert noise.kdf2(key, data) == (t1, t2)
    assert noise.kdf3(key, data) == (t1, t2, t3)


def test_xchacha20poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
        b" sunscreen would be it."
    )
    sealed = cookie.xaead_encrypt(key, nonce, pt, aad)
    assert sealed[:8].hex() == "bd6d179d3e83d43b"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert cookie.xaead_decrypt(key, nonce, sealed, aad) == pt
    assert cookie.xaead_decrypt(key, nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad) is None


def test_tai64n_layout_and_whitening() -> None:
    assert noise.tai64n(0.0) == bytes.fromhex("400000000000000a00000000")
    ts = noise.tai64n(1_700_000_000.999_999)
    seconds, nanos = int.from_bytes(ts[:8], "big"), int.from_bytes(ts[8:], "big")
    assert seconds == 0x400000000000000A + 1_700_000_000
    assert nanos & 0xFFFFFF == 0 and 999_999_999 - nanos < 1 << 24
    assert noise.tai64n(5.0) < noise.tai64n(5.02) < noise.tai64n(6.0)


def test_full_handshake_step_by_step() -> None:
    si_pub, sr_pub, ei_pub, er_pub = PUB(SI), PUB(SR), PUB(EI), PUB(ER)
    static_i = X25519PrivateKey.from_private_bytes(SI)
    static_r = X25519PrivateKey.from_private_bytes(SR)

    # ---- reference: initiator builds type 1 (A.3) ----
    c = H(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    h = H(H(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com"), sr_pub)
    (c,) = KDF(1, c, ei_pub)
    h = H(h, ei_pub)
    c, k = KDF(2, c, DH(EI, sr_pub))
    enc_static = AEAD(k, 0, si_pub, h)
    h = H(h, enc_static)
    c, k = KDF(2, c, DH(SI, sr_pub))
    enc_ts = AEAD(k, 0, TIMESTAMP, h)
    h = H(h, enc_ts)
    c_after_init, h_after_init = c, h
    body1 = (1).to_bytes(4, "little") + I_INDEX.to_bytes(4, "little") + ei_pub + enc_static + enc_ts
    mac1_i = MAC16(H(b"mac1----", sr_pub), body1)
    expected_init = body1 + mac1_i + bytes(16)

    msg1, state = noise.create_initiation(
        static=static_i,
        static_public=si_pub,
        remote_static=sr_pub,
        ephemeral=X25519PrivateKey.from_private_bytes(EI),
        sender_index=I_INDEX,
        timestamp=TIMESTAMP,
    )
    assert (state.chaining_key, state.hash) == (c_after_init, h_after_init)
    gen_to_r = cookie.CookieGenerator(sr_pub, refresh_time=120)
    gen_to_r.add_macs(msg1, now=0.0)
    assert bytes(msg1) == expected_init
    assert len(msg1) == INITIATION.size == 148

    # ---- responder consumes it ----
    checker_r = cookie.CookieChecker(sr_pub, rng=lambda n: bytes(n), refresh_time=120)
    assert checker_r.check_mac1(bytes(msg1))
    consumed = noise.consume_initiation(
        bytes(msg1), static=static_r, static_public=sr_pub, static_static=lambda pub: DH(SR, pub)
    )
    assert consumed.remote_static == si_pub
    assert consumed.timestamp == TIMESTAMP
    assert consumed.sender_index == I_INDEX
    assert (consumed.chaining_key, consumed.hash) == (c_after_init, h_after_init)

    # ---- reference: responder builds type 2 ----
    h = H(h, er_pub)
    (c,) = KDF(1, c, er_pub)
    (c,) = KDF(1, c, DH(ER, ei_pub))
    (c,) = KDF(1, c, DH(ER, si_pub))
    c, tau, k = KDF(3, c, PSK)
    h = H(h, tau)
    enc_empty = AEAD(k, 0, b"", h)
    body2 = (
        (2).to_bytes(4, "little") + R_INDEX.to_bytes(4, "little") + I_INDEX.to_bytes(4, "little") + er_pub + enc_empty
    )
    mac1_r = MAC16(H(b"mac1----", si_pub), body2)
    expected_resp = body2 + mac1_r + bytes(16)
    t1, t2 = KDF(2, c, b"")

    msg2, c_final_r = noise.create_response(
        consumed, ephemeral=X25519PrivateKey.from_private_bytes(ER), sender_index=R_INDEX, preshared_key=PSK
    )
    cookie.CookieGenerator(si_pub, refresh_time=120).add_macs(msg2, now=0.0)
    assert bytes(msg2) == expected_resp
    assert len(msg2) == RESPONSE.size == 92
    assert c_final_r == c
    assert noise.derive_transport_keys(c_final_r) == (t1, t2)

    # ---- initiator consumes type 2 and derives the same keys ----
    c_final_i = noise.consume_response(state, bytes(msg2), static=static_i, preshared_key=PSK)
    assert c_final_i == c
    # Initiator sends with T1; a transport message to the responder decrypts with T1.
    ct = AEAD(t1, 0, b"payload", b"")
    assert ChaCha20Poly1305(noise.derive_transport_keys(c_final_r)[0]).decrypt(bytes(12), ct, None) == b"payload"

    # Golden regression values for these fixed inputs (derived above; pinned against accidental change).
    assert hashlib.sha256(expected_init + expected_resp).hexdigest() == GOLDEN_SHA256


def test_response_with_wrong_psk_is_rejected() -> None:
    static_i = X25519PrivateKey.from_private_bytes(SI)
    static_r = X25519PrivateKey.from_private_bytes(SR)
    msg1, state = noise.create_initiation(
        static=static_i, static_public=PUB(SI), remote_static=PUB(SR),
        ephemeral=X25519PrivateKey.from_private_bytes(EI), sender_index=1, timestamp=TIMESTAMP,
    )
    consumed = noise.consume_initiation(bytes(msg1), static=static_r, static_public=PUB(SR),
                                        static_static=lambda pub: DH(SR, pub))
    msg2, _ = noise.create_response(consumed, ephemeral=X25519PrivateKey.from_private_bytes(ER), sender_index=2,
                                    preshared_key=b"\x01" * 32)
    try:
        noise.consume_response(state, bytes(msg2), static=static_i, preshared_key=PSK)
    except noise.HandshakeError:
        pass
    else:
        raise AssertionError("a response under a different PSK must not verify")


def test_initiation_for_another_responder_fails_to_decrypt() -> None:
    static_i = X25519PrivateKey.from_private_bytes(SI)
    msg1, _ = noise.create_initiation(
        static=static_i, static_public=PUB(SI), remote_static=PUB(SR),
        ephemeral=X25519PrivateKey.from_private_bytes(EI), sender_index=1, timestamp=TIMESTAMP,
    )
    other = bytes(range(200, 232))
    try:
        noise.consume_initiation(bytes(msg1), static=X25519PrivateKey.from_private_bytes(other),
                                 static_public=PUB(other), static_static=lambda pub: DH(other, pub))
    except noise.HandshakeError:
        pass
    else:
        raise AssertionError("decrypting someone else's initiation must fail")


def test_cookie_reply_roundtrip_and_mac2() -> None:
    sr_pub = PUB(SR)
    checker = cookie.CookieChecker(sr_pub, rng=lambda n: b"\x07" * n, refresh_time=120)
    gen = cookie.CookieGenerator(sr_pub, refresh_time=120)
    msg = bytearray(148)
    msg[0] = 1
    gen.add_macs(msg, now=0.0)
    assert msg[132:] == bytes(16)  # no cookie yet: mac2 is zero
    source = b"('192.0.2.1', 4242)"
    assert not checker.check_mac2(bytes(msg), source, now=0.0)
    reply = checker.make_reply(bytes(msg), 0xABCD, source, now=0.0)
    assert len(reply) == 64 and reply[:4] == b"\x03\0\0\0" and reply[4:8] == (0xABCD).to_bytes(4, "little")
    # Reference: the cookie is MAC(secret, source), sealed with HASH("cookie--" || Sr_pub) and AD = mac1.
    expected_cookie = MAC16(b"\x07" * 32, source)
    assert cookie.xaead_decrypt(H(b"cookie--", sr_pub), reply[8:32], reply[32:], bytes(msg[116:132])) == expected_cookie
    assert gen.consume_reply(reply, now=1.0)
    gen.add_macs(msg, now=2.0)
    assert bytes(msg[132:]) == MAC16(expected_cookie, bytes(msg[:132]))
    assert checker.check_mac2(bytes(msg), source, now=2.0)
    assert not checker.check_mac2(bytes(msg), b"another source", now=2.0)
    # A cookie older than COOKIE_REFRESH_TIME is no longer used.
    gen.add_macs(msg, now=200.0)
    assert msg[132:] == bytes(16)


def _hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 from the raw ChaCha20 block function (notes A.5): block minus initial state, words 0-3, 12-15."""
    import struct

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    initial = struct.unpack("<4I", b"expand 32-byte k") + struct.unpack("<8I", key) + struct.unpack("<4I", nonce16)
    out = [(w - s) & 0xFFFFFFFF for w, s in zip(words, initial, strict=True)]
    return struct.pack("<8I", *(out[0:4] + out[12:16]))


def test_hchacha20_vector_and_xchacha_cross_check() -> None:
    key = bytes(range(32))
    assert (
        _hchacha20(key, bytes.fromhex("000000090000004a0000000031415927")).hex()
        == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )
    # PyNaCl's XChaCha20-Poly1305 equals ChaCha20-Poly1305 under the HChaCha20 subkey.
    nonce = bytes(range(100, 124))
    subkey = _hchacha20(key, nonce[:16])
    expected = ChaCha20Poly1305(subkey).encrypt(b"\0\0\0\0" + nonce[16:], b"cookie-cookie-16", b"ad")
    assert cookie.xaead_encrypt(key, nonce, b"cookie-cookie-16", b"ad") == expected


def test_device_initiation_decodes_with_the_reference_chain() -> None:
    """A WireGuard device's type-1 message, opened step by step with the reference functions above."""
    from tsnet.key import NodePrivate
    from tsnet.wg import WireGuard

    sr = NodePrivate(SR)
    si = NodePrivate(SI)
    dev = WireGuard(si, now=0.0, rng=lambda n: b"\x5a" * n, wall_clock=lambda: 1_700_000_000.25)
    dev.add_peer(sr.public, endpoint=("192.0.2.1", 51820))
    dev.initiate_handshake(sr.public, 0.0)
    ((msg, dst),) = dev.datagrams_to_send(0.0)
    msg = bytes(msg)
    assert dst == ("192.0.2.1", 51820) and len(msg) == 148
    assert msg[:4] == b"\x01\0\0\0" and msg[4:8] == b"\x5a" * 4  # sender index straight from the rng
    e_pub = msg[8:40]
    assert e_pub == PUB(b"\x5a" * 32)
    assert msg[116:132] == MAC16(H(b"mac1----", sr.public.raw), msg[:116])
    assert msg[132:] == bytes(16)
    c = H(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    h = H(H(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com"), sr.public.raw)
    (c,) = KDF(1, c, e_pub)
    h = H(h, e_pub)
    c, k = KDF(2, c, DH(SR, e_pub))
    nonce = bytes(12)
    assert ChaCha20Poly1305(k).decrypt(nonce, msg[40:88], h) == si.public.raw
    h = H(h, msg[40:88])
    c, k = KDF(2, c, DH(SR, si.public.raw))
    ts = ChaCha20Poly1305(k).decrypt(nonce, msg[88:116], h)
    assert ts[:8] == (0x400000000000000A + 1_700_000_000).to_bytes(8, "big")
    assert int.from_bytes(ts[8:], "big") == 250_000_000 & ~0xFFFFFF
