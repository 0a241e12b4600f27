"""Packet filter cost per packet on its hot paths.

Run: ``.venv/bin/python benchmarks/filter_bench.py [--n 200000] [--rules 50]``. Prints a table
of ns/packet (thread CPU time, best of 5 runs) and a baseline row (an empty call) to
compare machines.  ``--rules`` adds that many non-matching rules in front of the
one that matches, to show the cost of rule scans (only SYNs, unsolicited UDP and ICMP
requests scan rules).
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsnet.control import tailcfg  # noqa: E402
from tsnet.netstack.filter import FilterState, PacketFilter  # noqa: E402
from tsnet.netstack.ip import ipv4_header, ipv6_header  # noqa: E402

ME4, ME6, PEER4, PEER6 = "100.64.0.1", "fd7a:115c:a1e0::1", "100.64.0.2", "fd7a:115c:a1e0::2"


def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    hdr = ipv4_header(s, d, proto, len(payload)) if len(s) == 4 else ipv6_header(s, d, proto, len(payload))
    return hdr + payload


def _tcp(src: str, dst: str, sport: int, dport: int, flags: int, size: int = 1200) -> bytes:
    return _ip(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, flags, 65535, 0, 0) + bytes(size))


def _udp(src: str, dst: str, sport: int, dport: int, size: int = 1200) -> bytes:
    return _ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + size, 0) + bytes(size))


def _rules(extra: int) -> list[tailcfg.FilterRule]:
    out = []
    for i in range(extra):
        out.append(tailcfg.FilterRule(
            src_ips=(f"100.65.{i // 250}.{i % 250 + 1}", f"fd7a:115c:a1e0::1:{i:x}"),
            dst_ports=(tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(first=22, last=22)),)))
    out.append(tailcfg.FilterRule(
        src_ips=(PEER4, PEER6),
        dst_ports=(tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(first=80, last=80)),)))
    return out


def _best(fn, n: int) -> float:
    # CPU time of this thread, best of 5: the machine is shared, wall time is noisy.
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        fn(n)
        best = min(best, time.thread_time() - t0)
    return best / n * 1e9


def _nothing(packet: bytes) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rules", type=int, default=50)
    args = ap.parse_args()
    n = args.n
    pf = PacketFilter.from_rules(_rules(args.rules), [ME4, ME6])
    state = FilterState(pf)
    for i in range(511):  # a full flow table
        state.note_outbound(_udp(ME4, f"100.66.{i // 250}.{i % 250 + 1}", 1000 + i, 53, 8))
    state.note_outbound(_udp(ME4, PEER4, 40000, 53))
    state.note_outbound(_udp(ME6, PEER6, 40000, 53))

    cases = [
        ("TCP non-SYN v4 (established)", _tcp(PEER4, ME4, 80, 40000, 0x10)),
        ("TCP non-SYN v6 (established)", _tcp(PEER6, ME6, 80, 40000, 0x10)),
        ("UDP reply v4 (flow cache hit)", _udp(PEER4, ME4, 53, 40000)),
        ("UDP reply v6 (flow cache hit)", _udp(PEER6, ME6, 53, 40000)),
        (f"TCP SYN v4 allowed by rule #{args.rules + 1}", _tcp(PEER4, ME4, 40000, 80, 0x02)),
        (f"TCP SYN v4 denied ({args.rules + 1} rules)", _tcp("100.99.0.1", ME4, 40000, 80, 0x02)),
        ("UDP v4 unsolicited, denied", _udp("100.99.0.1", ME4, 53, 40001)),
        ("TSMP v4", _ip(PEER4, ME4, 99, b"p12345678")),
    ]
    rows: list[tuple[str, str]] = []

    def run_empty(k: int) -> None:
        nothing = _nothing
        pkt = cases[0][1]
        for _ in range(k):
            nothing(pkt)

    rows.append(("baseline: loop + empty function call (this machine's speed)", f"{_best(run_empty, n):7.0f}"))
    for name, pkt in cases:
        check = state.check_inbound

        def run(k: int, check=check, pkt=pkt) -> None:
            for _ in range(k):
                check(pkt)

        rows.append((f"check_inbound: {name}", f"{_best(run, n):7.0f}"))
        assert state.check_inbound(pkt).reason is not None

    est4 = _tcp(PEER4, ME4, 80, 40000, 0x10)
    mv = memoryview(bytearray(est4))

    def run_mv(k: int) -> None:
        check = state.check_inbound
        for _ in range(k):
            check(mv)

    rows.append(("check_inbound: TCP non-SYN v4 as memoryview(bytearray)", f"{_best(run_mv, n):7.0f}"))

    batch = [est4] * 64

    def run_batch(k: int) -> None:
        f = state.filter_inbound
        for _ in range(k // 64):
            f(batch)

    rows.append(("filter_inbound: batch of 64 TCP non-SYN v4, per packet", f"{_best(run_batch, n):7.0f}"))
    out_udp = _udp(ME4, PEER4, 40000, 53)
    out_tcp = _tcp(ME4, PEER4, 40000, 80, 0x10)

    def run_out_udp(k: int) -> None:
        note = state.note_outbound
        for _ in range(k):
            note(out_udp)

    def run_out_tcp(k: int) -> None:
        note = state.note_outbound
        for _ in range(k):
            note(out_tcp)

    rows.append(("note_outbound: UDP v4 (existing flow refreshed)", f"{_best(run_out_udp, n):7.0f}"))
    rows.append(("note_outbound: TCP v4", f"{_best(run_out_tcp, n):7.0f}"))
    syn = _tcp("100.99.0.1", ME4, 40000, 80, 0x02)

    def run_reject(k: int) -> None:
        r = state.reject_for
        for _ in range(k):
            r(syn)

    rows.append(("reject_for: denied IPv4 SYN (re-check + build)", f"{_best(run_reject, n // 4):7.0f}"))

    # A big tailnet: 20 rules, each naming 200 nodes (400 addresses) as sources.
    big_rules = [tailcfg.FilterRule(
        src_ips=tuple(f"100.70.{r}.{i}" for i in range(1, 201))
        + tuple(f"fd7a:115c:a1e0::{r:x}:{i:x}" for i in range(1, 201)),
        dst_ports=(tailcfg.NetPortRange(ip=ME4, ports=tailcfg.PortRange(first=r, last=r)),)) for r in range(1, 21)]
    big = FilterState(PacketFilter.from_rules(big_rules, [ME4, ME6]))
    big_syn = _tcp("100.70.20.200", ME4, 40000, 20, 0x02)

    def run_big(k: int) -> None:
        check = big.check_inbound
        for _ in range(k):
            check(big_syn)

    assert big.check_inbound(big_syn).accepted
    rows.append(("check_inbound: TCP SYN v4, 20 rules x 400 sources, last matches", f"{_best(run_big, n // 4):7.0f}"))

    def run_compile(k: int) -> None:
        rules = _rules(args.rules)
        for _ in range(k):
            PacketFilter.from_rules(rules, [ME4, ME6])

    rows.append((f"from_rules: compile {args.rules + 1} rules (ns per filter)", f"{_best(run_compile, 50):7.0f}"))

    width = max(len(r[0]) for r in rows)
    print(f"{'path'.ljust(width)}  ns/packet")
    print("-" * (width + 11))
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
