"""TCP header and option encoding (RFC 9293 §3.1, RFC 7323, RFC 2018)."""

from __future__ import annotations

import struct

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

MAX_WSCALE = 14
HEADER = struct.Struct("!HHIIBBHHH")
_TS_OPT = struct.Struct("!BBBBII")  # NOP NOP kind len tsval tsecr (12 bytes, aligned)
_SACK_BLOCK = struct.Struct("!II")
SEQ_MASK = 0xFFFFFFFF


class Segment:
    """A received TCP segment (header fields, parsed options and a payload view).

    Sequence and acknowledgement numbers are the raw 32-bit values from the wire.
    """

    __slots__ = ("sport", "dport", "seq", "ack", "flags", "window", "payload",
                 "mss", "wscale", "sack_permitted", "tsval", "tsecr", "has_ts", "sack_blocks")

    def __init__(self) -> None:
        self.mss: int | None = None
        self.wscale: int | None = None
        self.sack_permitted = False
        self.has_ts = False
        self.tsval = 0
        self.tsecr = 0
        self.sack_blocks: list[tuple[int, int]] | None = None

    def __repr__(self) -> str:  # for test failure messages
        names = "".join(n for n, b in (("S", SYN), ("A", ACK), ("F", FIN), ("R", RST), ("P", PSH)) if self.flags & b)
        return f"<Segment {self.sport}->{self.dport} {names} seq={self.seq} ack={self.ack} len={len(self.payload)}>"


class BadSegment(ValueError):
    """Malformed TCP header or options."""


_HDR_TS = struct.Struct("!HHIIBBHHHIII")  # header + the usual aligned timestamp option
TS_LAYOUT = 0x0101080A  # NOP NOP kind=8 len=10, the layout nearly every stack sends
_TS_LAYOUT = TS_LAYOUT
_new_segment = object.__new__


def parse(data: memoryview) -> Segment:
    """Parse a TCP segment (checksum already verified by the caller)."""
    n = len(data)
    if n < 20:
        raise BadSegment("short TCP header")
    hlen = (data[12] >> 4) * 4
    if hlen < 20 or hlen > n:
        raise BadSegment("bad data offset")
    # Built without __init__ (this runs for every packet): every slot is set here.
    seg = _new_segment(Segment)
    seg.mss = None
    seg.wscale = None
    seg.sack_permitted = False
    seg.sack_blocks = None
    seg.payload = data[hlen:]
    if hlen == 32:
        seg.sport, seg.dport, seg.seq, seg.ack, _off, seg.flags, seg.window, _ck, _urg, layout, tsval, tsecr = \
            _HDR_TS.unpack_from(data)
        if layout == _TS_LAYOUT:
            seg.has_ts = True
            seg.tsval = tsval
            seg.tsecr = tsecr
            return seg
    else:
        seg.sport, seg.dport, seg.seq, seg.ack, _off, seg.flags, seg.window, _ck, _urg = HEADER.unpack_from(data)
    seg.has_ts = False
    seg.tsval = 0
    seg.tsecr = 0
    if hlen > 20:
        _parse_options(seg, data[20:hlen])
    return seg


def _parse_options(seg: Segment, opts: memoryview) -> None:
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_EOL:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise BadSegment("truncated option")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise BadSegment("bad option length")
        if kind == OPT_MSS and length == 4:
            seg.mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            seg.wscale = min(opts[i + 2], MAX_WSCALE)
        elif kind == OPT_SACK_PERMITTED and length == 2:
            seg.sack_permitted = True
        elif kind == OPT_TIMESTAMP and length == 10:
            seg.has_ts = True
            seg.tsval, seg.tsecr = _SACK_BLOCK.unpack_from(opts, i + 2)
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            seg.sack_blocks = [_SACK_BLOCK.unpack_from(opts, j) for j in range(i + 2, i + length, 8)]
        # Unknown options (and known ones with odd lengths) are skipped.
        i += length


def syn_options(mss: int, wscale: int | None, sack_permitted: bool, ts: tuple[int, int] | None) -> bytes:
    """Options for a SYN or SYN-ACK, laid out like Linux: MSS, SACK-perm+TS, NOP+WS."""
    out = bytearray(struct.pack("!BBH", OPT_MSS, 4, mss))
    if ts is not None:
        if sack_permitted:
            out += struct.pack("!BBBBII", OPT_SACK_PERMITTED, 2, OPT_TIMESTAMP, 10, ts[0], ts[1])
        else:
            out += _TS_OPT.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, ts[0], ts[1])
    elif sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return bytes(out)


def ts_option(tsval: int, tsecr: int) -> bytes:
    """The 12-byte aligned timestamp option (NOP NOP TS)."""
    return _TS_OPT.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, tsval, tsecr)


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    """NOP NOP SACK with the given (left, right) 32-bit edges."""
    out = bytearray((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))
    for left, right in blocks:
        out += _SACK_BLOCK.pack(left & SEQ_MASK, right & SEQ_MASK)
    return bytes(out)
