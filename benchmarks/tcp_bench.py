"""TCPConnection core cost: a bulk transfer between two in-memory connections.

No sockets, no trio: packets go from one outbox straight into the other side's
``receive_segment`` (parsed like the stack does). Prints time per data segment spent
in the sender (send() + processing ACKs) and in the receiver (processing data +
receive()), the parse cost the stack pays per packet, and the throughput the core
alone would allow on one core.

    .venv/bin/python benchmarks/tcp_bench.py [--mb 50] [--profile] [--micro]

``--micro`` times single hot-path steps instead (building one full data segment with
its checksum, verifying one), best of several repeats in thread CPU time, which is
steadier than the whole-transfer rows on a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

from tsnet.netstack import checksum, ip, tcp_wire
from tsnet.netstack.tcp import TCPConnection, TCPOptions, TCPState

A = bytes([100, 64, 0, 1])
B = bytes([100, 64, 0, 2])


def parse(pkt: bytes | bytearray) -> tcp_wire.Segment:
    return tcp_wire.parse(ip.parse(pkt).payload)


def run(total: int, opts: TCPOptions, loss_every: int = 0, coalesce: bool = False) -> dict[str, float]:
    now = 0.0
    a_out: list = []
    b_out: list = []
    a = TCPConnection.active(A, 40000, B, 80, iss=1, now=now, outbox=a_out, changed=[], options=opts)
    syn = parse(a_out.pop())
    b = TCPConnection.passive(B, 80, A, 40000, syn, iss=2, now=now, outbox=b_out, changed=[], options=opts)
    a.receive_segment(parse(b_out.pop()), now)
    b.receive_segment(parse(a_out.pop()), now)
    assert a.state == b.state == TCPState.ESTABLISHED
    b.coalesce_acks = coalesce
    chunk = os.urandom(256 * 1024)  # random payload: checksums of zeros would be unrealistically cheap
    sent = received = 0
    t_send = t_recv = t_parse = 0.0
    data_segs = ack_segs = 0
    n = 0
    clock = time.thread_time  # CPU time of this thread: robust on a shared, loaded machine
    while received < total:
        now += 0.0002  # 200 us per round of the loop: a fast link
        t0 = clock()
        while sent < total and a.send_space:
            sent += a.send(memoryview(chunk)[: min(len(chunk), total - sent)], now)
        t_send += clock() - t0
        pkts = a_out[:]
        a_out.clear()
        t0 = clock()
        segs = [parse(p) for p in pkts]
        t_parse += clock() - t0
        t0 = clock()
        for seg in segs:
            n += 1
            if loss_every and n % loss_every == 0:
                continue
            b.receive_segment(seg, now)
        if coalesce:
            b.flush_acks(now)
        while b.readable:
            received += len(b.receive(1 << 20, now))
        t_recv += clock() - t0
        data_segs += len(segs)
        acks = b_out[:]
        b_out.clear()
        t0 = clock()
        asegs = [parse(p) for p in acks]
        t_parse += clock() - t0
        ack_segs += len(asegs)
        t0 = clock()
        for seg in asegs:
            a.receive_segment(seg, now)
        t_send += clock() - t0
        for c in (a, b):
            t = c.get_timer()
            if t is not None and t <= now:
                c.handle_timer(now)
        if not segs and not acks:
            nxt = min(t for t in (a.get_timer(), b.get_timer()) if t is not None)
            now = max(now, nxt)
    assert a.internal_errors == b.internal_errors == 0
    return {
        "data_segs": data_segs, "ack_segs": ack_segs, "t_send": t_send, "t_recv": t_recv, "t_parse": t_parse,
        "retransmits": a.stats.retransmits, "bytes": total,
    }


def micro() -> None:
    """Per-step costs in microseconds (min over repeats of thread CPU time)."""
    now = 0.0
    a_out: list = []
    b_out: list = []
    opts = TCPOptions()
    a = TCPConnection.active(A, 40000, B, 80, iss=1, now=now, outbox=a_out, changed=[], options=opts)
    b = TCPConnection.passive(B, 80, A, 40000, parse(a_out.pop()), iss=2, now=now, outbox=b_out, changed=[],
                              options=opts)
    a.receive_segment(parse(b_out.pop()), now)
    payload = memoryview(os.urandom(a.send_mss))
    odd = memoryview(os.urandom(a.send_mss - 1))
    opt = a._options(now)
    wnd = a._window_field()
    a._emit(a.snd_nxt, 0x10, opt, payload, wnd)
    seg_full = bytes(ip.parse(a_out.pop()).payload)
    pseudo = checksum.pseudo_header_v4(A, B, ip.PROTO_TCP) + len(seg_full)
    n = 20000
    clock = time.thread_time

    def best(fn) -> float:
        times = []
        for _ in range(7):
            a_out.clear()
            t0 = clock()
            for _ in range(n):
                fn()
            times.append(clock() - t0)
        return min(times) / n * 1e6

    rows = [
        ("emit full data segment", lambda: a._emit(1000, 0x10, opt, payload, wnd)),
        ("emit odd-length segment", lambda: a._emit(1000, 0x10, opt, odd, wnd)),
        ("verify full segment", lambda: checksum.verify(seg_full, pseudo)),
        ("verify odd-length bytes", lambda: checksum.partial(odd)),
    ]
    print(f"{'step':28} {'us':>8}")
    for name, fn in rows:
        print(f"{name:28} {best(fn):>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--micro", action="store_true")
    args = ap.parse_args()
    if args.micro:
        micro()
        return
    total = args.mb * 1024 * 1024
    cases = [("default (ts+sack, cubic)", TCPOptions(), 0, False),
             ("default, ACK per batch", TCPOptions(), 0, True),
             ("no options", TCPOptions(timestamps=False, sack=False, window_scaling=True), 0, False),
             ("1% loss, sack", TCPOptions(), 100, False)]
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(total, TCPOptions())
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return
    print(f"{'case':28} {'data segs':>10} {'acks':>8} {'sender us/seg':>14} {'receiver us/seg':>16} "
          f"{'parse us/pkt':>13} {'core Mbit/s':>12}")
    for name, opts, loss, coalesce in cases:
        r = run(total, opts, loss, coalesce)
        ds = r["data_segs"]
        snd = r["t_send"] / ds * 1e6
        rcv = r["t_recv"] / ds * 1e6
        prs = r["t_parse"] / (ds + r["ack_segs"]) * 1e6
        mbit = r["bytes"] * 8 / (r["t_send"] + r["t_recv"]) / 1e6
        print(f"{name:28} {ds:>10} {r['ack_segs']:>8} {snd:>14.2f} {rcv:>16.2f} {prs:>13.2f} {mbit:>12.0f}")


if __name__ == "__main__":
    main()
