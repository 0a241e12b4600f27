"""Throughput of the WireGuard core vs the raw ChaCha20-Poly1305 call it wraps.

Encrypt: ``send_packet`` + ``datagrams_to_send`` (counter, header, AEAD, timers).
Decrypt: ``receive_datagram`` + ``drain_events`` (index lookup, AEAD, replay window,
IP length check, event). Raw: ``ChaCha20Poly1305.encrypt``/``decrypt`` alone on the
same 1280-byte packet (decrypt over as many distinct ciphertexts as the core sees).
Target: core <= 1.5x raw. Times are process CPU time, and raw and core runs are
interleaved, best of N, so that a busy machine disturbs both alike.

Run: .venv/bin/python benchmarks/wg_bench.py [--packets N] [--batch B]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import struct
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsnet.key import NodePrivate
from tsnet.wg import HandshakeCompleted, WireGuard
from tsnet.wg.limits import Limits

SIZE = 1280
# CPU time of this process: other processes competing for the (shared, 2-core) machine do not inflate it.
_clock = time.process_time


def ipv4_packet(size: int) -> bytes:
    header = bytes([0x45, 0]) + struct.pack(">H", size) + bytes(8) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    body = bytes(range(256)) * (size // 256 + 1)
    return header + body[: size - len(header)]


def make_pair() -> tuple[WireGuard, WireGuard, NodePrivate, NodePrivate]:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    limits = Limits()
    a = WireGuard(ka, now=0.0, limits=limits)
    b = WireGuard(kb, now=0.0, limits=limits)
    a.add_peer(kb.public, endpoint=("127.0.0.2", 2))
    b.add_peer(ka.public, endpoint=("127.0.0.1", 1))
    a.initiate_handshake(kb.public, 0.0)
    for _ in range(3):
        for d, _addr in a.datagrams_to_send(0.0):
            b.receive_datagram(bytes(d), ("127.0.0.1", 1), 0.0)
        for d, _addr in b.datagrams_to_send(0.0):
            a.receive_datagram(bytes(d), ("127.0.0.2", 2), 0.0)
    assert any(isinstance(e, HandshakeCompleted) for e in b.drain_events())
    a.drain_events()
    return a, b, ka, kb


def handshakes_per_second(count: int = 100) -> float:
    """Complete handshakes per second, both ends' CPU included (X25519 dominates)."""
    a, b, ka, kb = make_pair()
    t0 = _clock()
    now = 10.0
    for _ in range(count):
        now += 6.0  # past REKEY_TIMEOUT, so that each initiation goes out
        a.initiate_handshake(kb.public, now)
        for d, _addr in a.datagrams_to_send(now):
            b.receive_datagram(d, ("127.0.0.1", 1), now)
        for d, _addr in b.datagrams_to_send(now):
            a.receive_datagram(d, ("127.0.0.2", 2), now)
        for d, _addr in a.datagrams_to_send(now):
            b.receive_datagram(d, ("127.0.0.1", 1), now)
    elapsed = _clock() - t0
    assert a.counters.handshakes_completed == count + 1, a.counters
    return count / elapsed


def best_of(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64, help="packets between datagrams_to_send/drain_events calls")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n, batch = args.packets, args.batch
    packet = ipv4_packet(SIZE)
    assert len(packet) == SIZE

    a, b, ka, kb = make_pair()
    peer_b, peer_a = kb.public, ka.public

    # Pre-encrypt the decrypt workload (fresh counters each repeat: the replay window forbids reuse).
    def encrypted_batch() -> list[bytes]:
        out = []
        for _ in range(n):
            a.send_packet(peer_b, packet, 1.0)
        out = [bytes(d) for d, _ in a.datagrams_to_send(1.0)]
        assert len(out) == n
        return out

    def core_encrypt() -> float:
        send, take = a.send_packet, a.datagrams_to_send
        gc.collect()  # start each run with setup garbage collected, as a long-running node would be
        t0 = _clock()
        for i in range(0, n, batch):
            for _ in range(min(batch, n - i)):
                send(peer_b, packet, 1.0)
            take(1.0)
        return _clock() - t0

    def core_decrypt() -> float:
        wire = encrypted_batch()
        recv, drain = b.receive_datagram, b.drain_events
        addr = ("127.0.0.1", 1)
        received = 0
        gc.collect()  # start each run with setup garbage collected, as a long-running node would be
        t0 = _clock()
        for i in range(0, n, batch):
            for d in wire[i : i + batch]:
                recv(d, addr, 1.0)
            received += len(drain())
        elapsed = _clock() - t0
        assert received == n, (received, b.counters)
        return elapsed

    key = ChaCha20Poly1305.generate_key()
    aead = ChaCha20Poly1305(key)
    nonce = bytes(12)
    sealed = aead.encrypt(nonce, packet, None)

    def raw_encrypt() -> float:
        enc = aead.encrypt
        gc.collect()  # start each run with setup garbage collected, as a long-running node would be
        t0 = _clock()
        for _ in range(n):
            enc(nonce, packet, None)
        return _clock() - t0

    # The core decrypts n distinct datagrams (n * 1.3 kB, beyond the L2 cache); the raw baseline
    # decrypts n distinct ciphertexts too, so both read cold memory alike. raw_decrypt_hot reuses
    # one ciphertext (cache-hot), shown for reference.
    sealed_many = [aead.encrypt(nonce, packet, None) for _ in range(n)]

    def raw_decrypt() -> float:
        dec = aead.decrypt
        gc.collect()  # start each run with setup garbage collected, as a long-running node would be
        t0 = _clock()
        for ct in sealed_many:
            dec(nonce, ct, None)
        return _clock() - t0

    def raw_decrypt_hot() -> float:
        dec = aead.decrypt
        gc.collect()
        t0 = _clock()
        for _ in range(n):
            dec(nonce, sealed, None)
        return _clock() - t0

    b2_events = b._packet_events

    def core_decrypt_tuples() -> float:
        # The same path with packet_events=False: packets come back as (peer, packet) tuples.
        b._packet_events = False
        try:
            wire = encrypted_batch()
            recv, take = b.receive_datagram, b.packets_received
            addr = ("127.0.0.1", 1)
            received = 0
            gc.collect()
            t0 = _clock()
            for i in range(0, n, batch):
                for d in wire[i : i + batch]:
                    recv(d, addr, 1.0)
                received += len(take())
            elapsed = _clock() - t0
        finally:
            b._packet_events = b2_events
        assert received == n, (received, b.counters)
        return elapsed

    def core_encrypt_batch() -> float:
        send = a.send_packets
        take = a.datagrams_to_send
        chunk = [packet] * batch
        gc.collect()  # start each run with setup garbage collected, as a long-running node would be
        t0 = _clock()
        for i in range(0, n, batch):
            send(peer_b, chunk if n - i >= batch else chunk[: n - i], 1.0)
            take(1.0)
        return _clock() - t0

    def core_decrypt_batch() -> float:
        b._packet_events = False
        try:
            wire = encrypted_batch()
            addr = ("127.0.0.1", 1)
            chunks = [[(d, addr) for d in wire[i : i + batch]] for i in range(0, n, batch)]
            recv, take = b.receive_datagrams, b.packets_received
            received = 0
            gc.collect()
            t0 = _clock()
            for chunk in chunks:
                recv(chunk, 1.0)
                received += len(take())
            elapsed = _clock() - t0
        finally:
            b._packet_events = b2_events
        assert received == n, (received, b.counters)
        return elapsed

    hot = [float("inf")]

    cases = (
        ("encrypt", "send_packet", core_encrypt, raw_encrypt),
        ("encrypt", "send_packets (batch)", core_encrypt_batch, raw_encrypt),
        ("decrypt", "receive_datagram+events", core_decrypt, raw_decrypt),
        ("decrypt", "receive_datagram+tuples", core_decrypt_tuples, raw_decrypt),
        ("decrypt", "receive_datagrams+tuples", core_decrypt_batch, raw_decrypt),
    )
    # Interleave raw and core runs so that a noisy neighbour slows both alike; keep the best of each,
    # and also the median of the per-pair ratios (each core run against the raw run just before it).
    best: dict[int, list[float]] = {i: [float("inf"), float("inf")] for i in range(len(cases))}
    pair_ratios: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(args.repeats):
        for i, (_op, _path, core, raw) in enumerate(cases):
            t_raw, t_core = raw(), core()
            best[i][0] = min(best[i][0], t_raw)
            best[i][1] = min(best[i][1], t_core)
            pair_ratios[i].append(t_core / t_raw)
        hot[0] = min(hot[0], raw_decrypt_hot())

    print(f"WireGuard core vs raw ChaCha20-Poly1305: {SIZE}-byte packets, {n} per run, best of {args.repeats}, "
          f"batches of {batch}, process CPU time")
    print(f"{'op':<8} {'core path':<25} {'raw pkt/s':>10} {'raw MB/s':>9} {'core pkt/s':>11} {'core MB/s':>10} "
          f"{'raw us':>7} {'core us':>8} {'ratio':>6} {'median':>7}  target <= 1.5")
    for i, (op, path, _core, _raw) in enumerate(cases):
        t_raw, t_core = best[i]
        raw_pps, core_pps = n / t_raw, n / t_core
        ratio = t_core / t_raw
        median = statistics.median(pair_ratios[i])
        print(
            f"{op:<8} {path:<25} {raw_pps:>10,.0f} {raw_pps * SIZE / 1e6:>9.1f} {core_pps:>11,.0f} "
            f"{core_pps * SIZE / 1e6:>10.1f} {1e6 / raw_pps:>7.2f} {1e6 / core_pps:>8.2f} {ratio:>6.2f} {median:>7.2f}  "
            f"{'ok' if ratio <= 1.5 else 'MISSED'}"
        )
    print("ratio = best core time / best raw time; median = median over runs of core time / preceding raw time")
    hs = handshakes_per_second()
    print(f"full handshakes (initiation, response, first keepalive) between two devices: {hs:,.0f}/s")
    print(f"raw decrypt runs over {n} distinct ciphertexts like the core; one cache-hot ciphertext instead: "
          f"{hot[0] / n * 1e6:.2f} us")

if __name__ == "__main__":
    main()
