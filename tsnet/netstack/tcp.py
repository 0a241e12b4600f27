"""One TCP connection (RFC 9293) as a sans-IO core.

CONTRACT (fixed interface; the stack in ``stack.py`` builds on exactly this):

* A connection never touches a socket or the clock. Every entry point takes ``now``
  (seconds, float, monotonic). It is created by :meth:`TCPConnection.active` (we send
  the SYN) or :meth:`TCPConnection.passive` (answering a SYN a listener accepted).
* Addresses are raw bytes: 4 bytes for IPv4, 16 for IPv6. The connection builds whole
  IP packets itself (header templates from ``ip.py``, checksums from ``checksum.py``)
  and appends them to ``outbox``, a list it is given and shares with the stack.
* The stack parses the IP header, verifies the TCP checksum, parses the segment with
  ``tcp_wire.parse`` and calls :meth:`receive_segment`. It never raises on bad
  input: unacceptable segments are dropped (and counted in ``stats``).
* Whenever something the application can see changes (bytes became readable, send
  space grew, the connection got established, the peer sent FIN, an error, CLOSED),
  the connection sets ``app_changed`` and, on the False->True edge, appends itself to
  ``changed``, a list shared with the stack. The stack's driver wakes waiting tasks
  and resets ``app_changed`` to False.
* Timers: :meth:`get_timer` is the earliest deadline (RTO, persist, delayed ACK,
  keepalive, FIN-WAIT-2, TIME-WAIT, SYN retries) or None; the stack calls
  :meth:`handle_timer` at or after it.
* When ``state`` becomes CLOSED the stack forgets the connection (its 4-tuple is free).
"""

from __future__ import annotations

import enum
import errno
from bisect import bisect_right
from dataclasses import dataclass

from . import checksum
from .congestion import CongestionControl, make_controller
from .ip import PROTO_TCP, IPv4HeaderTemplate, IPv6HeaderTemplate
from .recvbuf import SMALL_PAYLOAD as _VIEW_MIN
from .recvbuf import ReceiveBuffer
from .tcp_wire import ACK, FIN, HEADER, PSH, RST, SYN, Segment, sack_option, syn_options, ts_option

__all__ = ["TCPConnection", "TCPOptions", "TCPState", "TCPStats"]

# Internally every sequence number is an *unwrapped* Python int (it keeps growing past
# 2**32); only the wire carries ``x & _M``. Incoming numbers are unwrapped against a
# nearby reference, so no comparison anywhere needs modular arithmetic.
_M = 0xFFFFFFFF
_HALF = 1 << 31
#: With ``coalesce_acks``, in-order data is still ACKed at least every this many full
#: segments inside one big received batch, so the sender's window keeps moving (and its
#: bursts stay bounded) while we work through the batch.
ACK_STRETCH_SEGMENTS = 32
_ACK_STRETCH = 2 * ACK_STRETCH_SEGMENTS  # in _unacked_segs units (2 per full segment)
_WRAP = 1 << 32
_pack_hdr = HEADER.pack
_FOLD_1, _FOLD_2, _MASK_1, _MASK_2 = checksum.FOLD_1, checksum.FOLD_2, checksum.MASK_1, checksum.MASK_2
_FOLD_MIN_BYTES = checksum.FOLD_MIN_BYTES
_partial = checksum.partial
_from_bytes = int.from_bytes
_finish = checksum.finish

_TS_HZ = 1000  # timestamp clock: 1 ms ticks (RFC 7323 recommends 1 ms)
_PAWS_IDLE = 24 * 24 * 3600.0  # TS.Recent older than 24 days is not trusted (RFC 7323 §5.5)
_CHALLENGE_ACK_LIMIT = 10  # challenge ACKs per connection per second (RFC 5961 §7)
_DUPTHRESH = 3
_INITIAL_WINDOW = 10
_MAX_OOO_BLOCKS = 64  # bounds reassembly work even against pathological 1-byte holes
# Separate SACKed ranges the sender keeps: a peer reporting every other byte cannot make each ACK
# cost time in proportion to our whole flight. SACK is advisory (RFC 2018 §8): ignoring a block
# only makes recovery less exact.
_MAX_SACK_SCOREBOARD = 256
_RTO_GRANULARITY = 0.001
_FAST_FLAGS_MASK = FIN | SYN | RST | ACK | 0x20  # everything but PSH (0x20 = URG)
_PERSIST_MAX = 60.0
_MAX_SACK_OPT_BLOCKS_TS = 3  # 40 option bytes: 12 for timestamps leave room for 3 blocks
_MAX_SACK_OPT_BLOCKS = 4
_TLP_MIN_EXTRA = 0.002  # added to 2*SRTT so a probe does not race the ACK of a full flight
_REO_WND_PERSIST = 16  # recoveries a D-SACK-widened reordering window is kept for (RFC 8985 §6.2)


def _unwrap(wire: int, ref: int) -> int:
    """The unwrapped sequence number closest to ``ref`` whose low 32 bits are ``wire``."""
    d = (wire - ref) & _M
    if d >= _HALF:
        d -= _WRAP
    return ref + d


class TCPState(enum.IntEnum):
    """RFC 9293 connection states (LISTEN lives in the stack's listener, not here)."""

    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10


# Members as plain module globals for the per-segment paths: looking an IntEnum member up
# on its class costs ~0.4 us in CPython 3.11, a global ~0.05 us.
_CLOSED = TCPState.CLOSED
_SYN_SENT = TCPState.SYN_SENT
_ESTABLISHED = TCPState.ESTABLISHED
_SYN_RECEIVED = TCPState.SYN_RECEIVED
_SENDING_STATES = frozenset((TCPState.ESTABLISHED, TCPState.CLOSE_WAIT, TCPState.FIN_WAIT_1,
                             TCPState.LAST_ACK, TCPState.CLOSING))


@dataclass(frozen=True, slots=True)
class TCPOptions:
    """Per-connection settings. Defaults follow ../shared/protocols/wireguard-netstack.md B.2."""

    mtu: int = 1280  # MSS advertised = mtu - IP header - 20 (1240 v4, 1220 v6)
    nagle: bool = False
    congestion: str = "cubic"  # or "reno"
    recv_buffer: int = 128 * 1024  # initial receive buffer; autotuned up to recv_buffer_max
    recv_buffer_max: int = 4 * 1024 * 1024
    send_buffer: int = 1024 * 1024  # send() accepts at most this many unacknowledged+unsent bytes
    delayed_ack: float = 0.040  # at most this long; every second full segment is ACKed at once
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 120.0
    syn_retries: int = 6
    data_retries: int = 15  # give up (TimeoutError) after this many backed-off RTOs without progress
    user_timeout: float | None = None  # or give up after this long without progress
    time_wait: float = 2.0  # short by default, configurable (RFC says 2*MSL)
    fin_wait_2_timeout: float = 60.0
    keepalive_idle: float | None = None  # None = keepalive off
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    window_scaling: bool = True
    sack: bool = True
    timestamps: bool = True
    rack: bool = True  # RACK-TLP (RFC 8985) loss detection and tail loss probes when SACK is negotiated


@dataclass(slots=True)
class TCPStats:
    """Counters and estimates for status and tests."""

    segments_received: int = 0
    segments_sent: int = 0
    bytes_received: int = 0  # payload bytes accepted in order
    bytes_sent: int = 0  # payload bytes sent, retransmissions included
    retransmits: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    dropped: int = 0  # unacceptable / malformed segments
    challenge_acks: int = 0
    lost_retransmits: int = 0  # retransmissions detected lost during SACK recovery (added)
    tlp_probes: int = 0  # tail loss probes sent (RFC 8985 §7)
    rack_marks: int = 0  # times RACK's time-based rule found data lost
    reordering_seen: bool = False  # RACK saw reordering (D-SACK or a hole filled by itself)
    srtt: float | None = None
    rto: float = 1.0
    cwnd: int = 0
    ssthresh: int = 0


class TCPConnection:
    """One connection. See the module docstring for the contract with the stack.

    Extras beyond the contract (all optional for the stack):

    * ``internal_errors`` counts exceptions caught at the entry points (0 unless there
      is a bug); ``snd_wscale``/``rcv_wscale``, ``sack_ok``, ``ts_ok`` and ``send_mss``
      describe what the handshake negotiated; ``recv_buffer_size`` is the autotuned
      buffer; ``stats.lost_retransmits`` counts retransmissions found lost in recovery.
    * :meth:`set_options` (Nagle/keepalive/timeouts on a live connection),
      :meth:`time_wait_reopen_ok` (may a SYN reuse a TIME-WAIT 4-tuple),
      :meth:`set_path_mtu` (ICMP frag-needed / packet-too-big),
      ``coalesce_acks`` + :meth:`flush_acks` (one ACK per received batch).

    Design notes: sequence numbers are kept unwrapped (Python ints that grow past
    2**32; only the wire is mod 2**32), so comparisons are plain. The send buffer is
    one bytearray from SND.UNA on (ACKed bytes are deleted from the front, which
    CPython does without moving the rest); segments are built from a memoryview of it.
    The receive buffer is a bytearray too, out-of-order data a short sorted list of
    blocks bounded by the advertised window. In-order data and plain ACKs in
    ESTABLISHED take a fast path; everything else goes through the full RFC 9293
    §3.10.7 rules. Loss recovery is RFC 6675 (SACK scoreboard, pipe, NextSeg) with
    RACK-TLP (RFC 8985) as its loss detector: holes are lost by time (sent more than
    RACK.rtt + reordering window before a segment that was delivered), which also
    finds lost retransmissions, and a tail loss probe 2*SRTT after the last send gets
    the peer to SACK what a lost tail left unreported, instead of waiting for the RTO.
    The RFC 6675 three-segment rule stays on until reordering is seen (D-SACK). Without
    SACK (or with ``TCPOptions.rack`` off) it is RFC 6582 NewReno / plain RFC 6675; congestion
    control comes from ``congestion.py`` (CUBIC or Reno, HyStart++). The FIN-WAIT-2
    timeout applies only after :meth:`close` (after :meth:`shutdown` the application
    may keep reading for as long as the peer sends).
    """

    __slots__ = (
        "local_ip", "local_port", "remote_ip", "remote_port", "state", "options", "stats",
        "app_changed", "error", "internal_errors", "outbox", "changed", "coalesce_acks",
        "_iphdr", "_pseudo", "_passive", "_was_established",
        # send side
        "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1", "snd_wl2", "max_snd_wnd",
        "_sndbuf", "_buf_seq", "_fin_seq", "_shut_wr", "_app_closed",
        "snd_wscale", "rcv_wscale", "_ws_ok", "sack_ok", "ts_ok", "_our_mss", "_peer_mss", "send_mss",
        "_cc", "_dupacks", "_in_recovery", "_recover", "_rto_recover", "_rxt_mark", "_una_rxt_time", "_high_rxt", "_sacked", "_sacked_bytes",
        # receive side
        "irs", "rcv_nxt", "rcv_adv", "_rcvbuf", "recv_buffer_size", "_ooo", "_ooo_stamp",
        "_ooo_fin", "_dsack", "_fin_received", "_rcv_full", "_unacked_segs", "_ack_now", "_last_ack_sent",
        "_rcv_space_time", "_rcv_space_copied", "_rcv_rtt", "_rcv_rtt_seq", "_rcv_rtt_time", "_rcv_rtt_tsecr",
        # timestamps
        "_ts_offset", "_ts_recent", "_ts_recent_time", "_ts_floor",
        # RTT / timers
        "_srtt", "_rttvar", "_rto", "_rtt_seq", "_rtt_time", "_retries", "_progress_time",
        "_rto_deadline", "_persist_deadline", "_persist_backoff", "_delack_deadline",
        "_ka_deadline", "_ka_probes", "_state_deadline", "_last_rcv_time",
        "_challenge_time", "_challenge_count",
        # RACK-TLP (RFC 8985)
        "_rack", "_rk_start", "_rk_end", "_rk_time", "_rk_rxt", "_rk_xmit_ts", "_rk_end_seq", "_rk_rtt",
        "_rk_lost_to", "_rk_deadline", "_rk_reord", "_rk_mult", "_rk_persist", "_rk_dsack_round", "_min_rtt",
        "_tlp_deadline", "_tlp_high", "_tlp_rxt", "_tlp_ts", "_rk_clock",
    )

    # --- construction -----------------------------------------------------------

    def __init__(
        self,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        iss: int,
        now: float,
        outbox: list[bytes | bytearray],
        changed: list[TCPConnection],
        options: TCPOptions,
        ts_offset: int,
    ) -> None:
        """Use :meth:`active` or :meth:`passive`."""
        self.local_ip = bytes(local_ip)
        self.local_port = local_port
        self.remote_ip = bytes(remote_ip)
        self.remote_port = remote_port
        self.options = options
        self.stats = TCPStats(rto=options.initial_rto)
        self.state = TCPState.CLOSED
        self.app_changed = False
        self.error: OSError | None = None
        self.internal_errors = 0
        #: set by a stack that calls flush_acks() after each batch of packets
        self.coalesce_acks = False
        self.outbox = outbox
        self.changed = changed
        v4 = len(local_ip) == 4
        # _pseudo: the pseudo-header's residue without its length (added per segment).
        if v4:
            self._iphdr = IPv4HeaderTemplate(self.local_ip, self.remote_ip, PROTO_TCP)
            self._pseudo = checksum.pseudo_header_v4(self.local_ip, self.remote_ip, PROTO_TCP)
        else:
            self._iphdr = IPv6HeaderTemplate(self.local_ip, self.remote_ip, PROTO_TCP)
            self._pseudo = checksum.pseudo_header_v6(self.local_ip, self.remote_ip, PROTO_TCP)
        self._passive = False
        self._was_established = False
        # Our MSS from the MTU; the peer's default when its SYN has no MSS option (RFC 9293 §3.7.1).
        self._our_mss = max(options.mtu - (20 if v4 else 40) - 20, 64)
        self._peer_mss = 536 if v4 else 1220
        iss &= _M
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = iss
        self.max_snd_wnd = 0
        self._sndbuf = bytearray()
        self._buf_seq = iss + 1  # sequence number of _sndbuf[0]
        self._fin_seq: int | None = None  # our FIN's sequence number once shutdown() queued it
        self._shut_wr = False
        self._app_closed = False
        self.snd_wscale = 0
        self.rcv_wscale = 0
        self._ws_ok = False
        if options.window_scaling:
            shift = 0
            while shift < 14 and (options.recv_buffer_max >> shift) > 0xFFFF:
                shift += 1
            self.rcv_wscale = shift
        self.sack_ok = False
        self.ts_ok = False
        self.send_mss = self._our_mss
        self._cc: CongestionControl = make_controller(options.congestion, self._our_mss, _INITIAL_WINDOW)
        self._dupacks = 0
        self._in_recovery = False
        self._recover = iss
        # After an RTO, duplicate ACKs caused by the go-back-N resend of data the peer
        # already had must not start a fast retransmit until everything sent before
        # the timeout is acknowledged (RFC 6582 §4.1 "recover", strictly above).
        self._rto_recover = iss
        self._rxt_mark = iss  # SND.MAX when we last retransmitted in recovery
        self._una_rxt_time = now  # when the hole at SND.UNA was (about) retransmitted
        self._high_rxt = iss
        self._sacked: list[list[int]] = []  # SACK scoreboard: sorted disjoint [start, end) above snd_una
        self._sacked_bytes = 0
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self._rcvbuf = ReceiveBuffer()
        self.recv_buffer_size = options.recv_buffer
        self._ooo: list[list] = []  # sorted disjoint [start, end, bytearray, stamp]
        self._ooo_stamp = 0
        self._ooo_fin: int | None = None
        self._dsack: tuple[int, int] | None = None  # a duplicate to report once (RFC 2883)
        self._fin_received = False
        self._rcv_full = self._our_mss  # largest segment seen: what counts as "full-sized"
        self._unacked_segs = 0
        self._ack_now = False
        self._last_ack_sent = 0
        self._rcv_space_time = now
        self._rcv_space_copied = 0
        self._rcv_rtt: float | None = None
        self._rcv_rtt_seq: int | None = None
        self._rcv_rtt_time = 0.0
        self._rcv_rtt_tsecr: int | None = None  # the echoed timestamp of the last receiver RTT sample
        self._ts_offset = ts_offset & _M
        self._ts_recent = 0
        self._ts_recent_time = now
        self._ts_floor: int | None = None  # echoes older than our last RTO are ambiguous
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = options.initial_rto
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._retries = 0
        self._progress_time = now
        self._rto_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._delack_deadline: float | None = None
        self._ka_deadline: float | None = None
        self._ka_probes = 0
        self._state_deadline: float | None = None
        self._last_rcv_time = now
        self._challenge_time = now
        self._challenge_count = 0
        # RACK: when each range of original data was sent (three parallel lists, sorted,
        # one entry per send call, not per segment) and the retransmissions in flight
        # ([start, end, time], in send order). RACK.xmit_ts/end_seq/rtt describe the most
        # recently sent segment known delivered; holes below _rk_lost_to are lost.
        # Send times are keys (now, n): ``n`` counts retransmissions, so a batch of
        # sends sharing one ``now`` still has an order (RFC 8985 breaks ties by
        # sequence number, which is wrong for a retransmission sent after new data).
        self._rack = False  # set once SACK is negotiated
        self._rk_clock = 0
        self._rk_start: list[int] = []
        self._rk_end: list[int] = []
        self._rk_time: list[tuple[float, int]] = []
        self._rk_rxt: list[list] = []
        self._rk_xmit_ts: tuple[float, int] | None = None
        self._rk_end_seq = iss
        self._rk_rtt = 0.0
        self._rk_lost_to = iss
        self._rk_deadline: float | None = None  # reordering timer
        self._rk_reord = False
        self._rk_mult = 1
        self._rk_persist = 0
        self._rk_dsack_round: int | None = None
        self._min_rtt: float | None = None
        self._tlp_deadline: float | None = None
        self._tlp_high: int | None = None  # SND.MAX when the episode's probe went out
        self._tlp_rxt = False
        self._tlp_ts = 0

    @classmethod
    def active(
        cls,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        *,
        iss: int,
        now: float,
        outbox: list[bytes | bytearray],
        changed: list[TCPConnection],
        options: TCPOptions = TCPOptions(),
        ts_offset: int = 0,
    ) -> TCPConnection:
        """Active open: state SYN_SENT, the SYN is already in ``outbox``."""
        c = cls(local_ip, local_port, remote_ip, remote_port, iss, now, outbox, changed, options, ts_offset)
        c.state = TCPState.SYN_SENT
        c.snd_nxt = c.snd_max = c.iss + 1
        c._send_syn(now, with_ack=False)
        c._rto_deadline = now + c._rto
        c._rtt_seq, c._rtt_time = c.snd_nxt, now
        return c

    @classmethod
    def passive(
        cls,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        syn: Segment,
        *,
        iss: int,
        now: float,
        outbox: list[bytes | bytearray],
        changed: list[TCPConnection],
        options: TCPOptions = TCPOptions(),
        ts_offset: int = 0,
    ) -> TCPConnection:
        """Passive open from a listener's SYN: state SYN_RECEIVED, the SYN-ACK is in ``outbox``."""
        c = cls(local_ip, local_port, remote_ip, remote_port, iss, now, outbox, changed, options, ts_offset)
        c._passive = True
        c.state = TCPState.SYN_RECEIVED
        c._take_syn(syn, now)
        c.snd_nxt = c.snd_max = c.iss + 1
        c._send_syn(now, with_ack=True)
        c._rto_deadline = now + c._rto
        if not c.ts_ok:
            c._rtt_seq, c._rtt_time = c.snd_nxt, now
        return c

    # --- what the stack reads -------------------------------------------------

    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int
    state: TCPState
    options: TCPOptions
    stats: TCPStats
    #: set when app-visible state changed; the driver resets it after waking waiters
    app_changed: bool
    #: why the connection failed: ConnectionRefusedError, ConnectionResetError, TimeoutError
    #: (all OSError with errno set), or None. Set once; state is CLOSED then.
    error: OSError | None

    # --- packets and time -----------------------------------------------------

    def receive_segment(self, seg: Segment, now: float) -> None:
        """Process one segment for this 4-tuple (checksum already verified). Never raises."""
        self.stats.segments_received += 1
        try:
            self._receive(seg, now)
        except Exception:  # a bug must not take the node down; counted and visible in tests
            self.internal_errors += 1
            self.stats.dropped += 1

    def get_timer(self) -> float | None:
        """Earliest pending deadline, or None."""
        best = self._rto_deadline
        for d in (self._delack_deadline, self._persist_deadline, self._ka_deadline, self._state_deadline,
                  self._tlp_deadline, self._rk_deadline):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def handle_timer(self, now: float) -> None:
        """Fire every timer whose deadline is <= now."""
        try:
            self._handle_timer(now)
        except Exception:
            self.internal_errors += 1

    # --- the application side -------------------------------------------------

    @property
    def readable(self) -> int:
        """Bytes waiting in the receive buffer."""
        return len(self._rcvbuf)

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read."""
        return self._fin_received and not self._rcvbuf

    @property
    def send_space(self) -> int:
        """How many bytes :meth:`send` would accept now (0 while the buffer is full)."""
        if self._shut_wr or self.state == TCPState.CLOSED:
            return 0
        return max(self.options.send_buffer - len(self._sndbuf), 0)

    @property
    def is_established(self) -> bool:
        """The handshake completed (true from ESTABLISHED onwards, also while closing).

        Stays true once set, even after the connection reached CLOSED.
        """
        return self._was_established

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue up to ``send_space`` bytes for sending; returns how many were taken.

        Raises BrokenPipeError after :meth:`shutdown`/:meth:`close`, and ``self.error``
        if the connection failed.
        """
        if self.error is not None:
            raise self.error
        if self._shut_wr or self.state == TCPState.CLOSED:
            raise BrokenPipeError(errno.EPIPE, "connection closed for sending")
        n = min(len(data), self.options.send_buffer - len(self._sndbuf))
        if n <= 0:
            return 0
        if n == len(data):
            self._sndbuf += data
        else:
            self._sndbuf += memoryview(data)[:n]
        if self._was_established:
            self._output(now)
        return n

    def receive(self, max_bytes: int, now: float) -> bytes:
        """Take up to ``max_bytes`` from the receive buffer (b"" if none yet; check ``at_eof``).

        Freeing buffer space may queue a window update.
        """
        data = self._rcvbuf.take(max_bytes)
        n = len(data)
        if not n:
            return b""
        self._rcv_space_copied += n
        self._autotune(now)
        if self.state in (TCPState.ESTABLISHED, TCPState.FIN_WAIT_1, TCPState.FIN_WAIT_2):
            # Window update when the window the peer sees would at least double
            # (covers a closed window being drained) and grow by a full segment.
            cur = self.rcv_adv - self.rcv_nxt
            new = self._window_available()
            if new >= 2 * cur and new - cur >= min(self._rcv_full, self.recv_buffer_size >> 1):
                self._send_ack(now)
        return data

    def shutdown(self, now: float) -> None:
        """Half-close: send FIN after everything already queued. Idempotent."""
        if self._shut_wr:
            return
        st = self.state
        if st == TCPState.CLOSED:
            self._shut_wr = True
            return
        self._shut_wr = True
        self._fin_seq = self._buf_seq + len(self._sndbuf)
        if st == TCPState.ESTABLISHED:
            self.state = TCPState.FIN_WAIT_1
        # In SYN-SENT / SYN-RECEIVED the FIN (after queued data) goes out once
        # established (RFC 9293 §3.10.4 queues it); the state then is FIN-WAIT-1.
        if st == TCPState.CLOSE_WAIT:
            self.state = TCPState.LAST_ACK
        if self._was_established:
            self._output(now)

    def close(self, now: float) -> None:
        """Full close: like :meth:`shutdown`, but unread received data (or data that
        arrives later) makes it reset the connection (RFC 9293 §3.6 / RFC 2525)."""
        self._app_closed = True
        if self.state == TCPState.CLOSED:
            return
        if self.state == TCPState.SYN_SENT:
            self.abort(now)  # nothing synchronised: delete the connection (RFC 9293 §3.10.4)
            return
        if self._rcvbuf or self._ooo:
            self.abort(now)
            return
        self.shutdown(now)
        if self.state == TCPState.FIN_WAIT_2 and self._state_deadline is None:
            self._state_deadline = now + self.options.fin_wait_2_timeout

    def abort(self, now: float) -> None:
        """Send RST (if synchronized) and go to CLOSED at once."""
        if self.state == TCPState.CLOSED:
            return
        if self.state not in (TCPState.SYN_SENT,):
            self._send_rst(self.snd_max, now)
        self._shut_wr = True
        self._enter_closed(None)

    # --- extras for the stack -------------------------------------------------

    def time_wait_reopen_ok(self, seg: Segment) -> bool:
        """In TIME-WAIT, may this new SYN start a new connection on the same 4-tuple?

        True when its sequence number is beyond what we received (RFC 9293 §3.10.7.4
        / RFC 6191 without timestamps); the stack then forgets this connection first.
        """
        if self.state != TCPState.TIME_WAIT or not (seg.flags & SYN) or (seg.flags & (ACK | RST)):
            return False
        if self.ts_ok and seg.has_ts:
            return ((seg.tsval - self._ts_recent) & _M) < _HALF and seg.tsval != self._ts_recent
        return _unwrap(seg.seq, self.rcv_nxt) > self.rcv_nxt

    def set_options(self, options: TCPOptions, now: float) -> None:
        """Change a live connection's settings. Takes effect at once for Nagle, keepalive
        (re-armed from ``now``), timeouts, retries and delayed ACK; buffer sizes, MTU and
        the negotiated options (window scaling, SACK, timestamps, congestion control,
        RACK-TLP) stay as they were set up."""
        old = self.options
        self.options = options
        if (options.keepalive_idle, options.keepalive_interval) != (old.keepalive_idle, old.keepalive_interval) \
                and self._was_established and self.state != TCPState.CLOSED:
            self._ka_probes = 0
            self._ka_deadline = None if options.keepalive_idle is None else now + options.keepalive_idle
        if old.nagle and not options.nagle and self._was_established:
            try:
                self._output(now)  # small segments Nagle was holding may go now
            except Exception:
                self.internal_errors += 1

    def flush_acks(self, now: float) -> None:
        """End of a batch of received packets (only needed with ``coalesce_acks``).

        With ``coalesce_acks`` set, in-order data is not ACKed every second segment
        while a batch is being fed in; this sends one ACK for the whole batch instead
        (like gVisor: fewer ACKs for the peer to process) once it holds at least two
        full segments; less waits for the delayed-ACK timer as usual. Out-of-order
        data, holes filled and FINs are still ACKed at once.
        """
        if self._unacked_segs >= 4 and self.state not in (TCPState.CLOSED, TCPState.SYN_SENT):
            try:
                self._send_ack(now)
            except Exception:
                self.internal_errors += 1

    def set_path_mtu(self, mtu: int, now: float) -> None:
        """ICMP fragmentation-needed / packet-too-big: send smaller segments from now on
        (never below 536 - options for IPv4 / 1220 for IPv6 minimum MTUs)."""
        ip_hdr = 20 if len(self.local_ip) == 4 else 40
        floor = 576 if ip_hdr == 20 else 1280
        mss = max(mtu, floor) - ip_hdr - 20
        new = min(self._peer_mss, self._our_mss, mss) - (12 if self.ts_ok else 0)
        if new < self.send_mss:
            self.send_mss = new

    # === internals ==============================================================

    # --- state helpers ---

    def _notify(self) -> None:
        if not self.app_changed:
            self.app_changed = True
            self.changed.append(self)

    def _enter_closed(self, error: OSError | None) -> None:
        if self.state == TCPState.CLOSED and self.error is not None:
            return
        if error is not None and self.error is None:
            self.error = error
        self.state = TCPState.CLOSED
        self._rto_deadline = self._persist_deadline = self._delack_deadline = None
        self._ka_deadline = self._state_deadline = None
        self._tlp_deadline = self._rk_deadline = None
        self._notify()

    def _enter_time_wait(self, now: float) -> None:
        self.state = TCPState.TIME_WAIT
        self._rto_deadline = self._persist_deadline = self._ka_deadline = None
        self._tlp_deadline = self._rk_deadline = None
        self._state_deadline = now + self.options.time_wait
        self._notify()

    def _become_established(self, now: float) -> None:
        self._was_established = True
        if self.state in (TCPState.SYN_SENT, TCPState.SYN_RECEIVED):
            self.state = TCPState.FIN_WAIT_1 if self._shut_wr else TCPState.ESTABLISHED
            if self.stats.timeouts:
                # Our SYN or SYN-ACK had to be retransmitted: start with one segment (RFC 5681 §3.1,
                # RFC 6928 §2) and, without an RTT sample yet, an RTO of at least 3 s (RFC 6298 §5.7).
                self._cc.cwnd = self.send_mss
                if self._srtt is None:
                    self._rto = self._clamped_rto(max(self._rto, 3.0))
        self._retries = 0
        self._progress_time = now
        self._rcv_space_time = now
        if self.options.keepalive_idle is not None:
            self._ka_deadline = now + self.options.keepalive_idle
        self._notify()

    def _take_syn(self, syn: Segment, now: float) -> None:
        """Record the peer's SYN: IRS and the options both sides agreed on."""
        opts = self.options
        self.irs = syn.seq
        self.rcv_nxt = syn.seq + 1
        self._last_ack_sent = self.rcv_nxt
        if syn.mss is not None and syn.mss > 0:
            self._peer_mss = max(syn.mss, 64)
        if opts.window_scaling and syn.wscale is not None:
            self.snd_wscale = syn.wscale
            self._ws_ok = True
        else:
            self.snd_wscale = 0
            self.rcv_wscale = 0
        self.sack_ok = opts.sack and syn.sack_permitted
        self._rack = opts.rack and self.sack_ok
        if opts.timestamps and syn.has_ts:
            self.ts_ok = True
            self._ts_recent = syn.tsval
            self._ts_recent_time = now
        else:
            self.ts_ok = False
        base = min(self._peer_mss, self._our_mss)
        self.send_mss = base - (12 if self.ts_ok else 0)
        self._rcv_full = self.send_mss
        # The congestion controller works in full data segments.
        self._cc = make_controller(opts.congestion, self.send_mss, _INITIAL_WINDOW)
        self.snd_wnd = syn.window  # never scaled in a SYN
        self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
        self.snd_wl1 = syn.seq
        self._update_stats()

    # --- output ---

    def _ts_now(self, now: float) -> int:
        return (int(now * _TS_HZ) + self._ts_offset) & _M

    def _window_available(self) -> int:
        """Right edge we could offer now, as an amount above rcv_nxt (scale-aligned)."""
        free = self.recv_buffer_size - len(self._rcvbuf)
        if free <= 0:
            return 0
        ws = self.rcv_wscale
        free = min(free, 0xFFFF << ws)
        return (free >> ws) << ws

    def _window_field(self) -> int:
        """Update rcv_adv (receiver SWS avoidance: grow only by a worthwhile amount) and
        return the 16-bit window field."""
        avail = self._window_available()
        edge = self.rcv_nxt + avail
        adv = self.rcv_adv
        if edge > adv:
            if edge - adv >= min(self.recv_buffer_size >> 1, self._rcv_full):
                self.rcv_adv = adv = edge
        wnd = adv - self.rcv_nxt
        if wnd <= 0:
            return 0
        return min(wnd >> self.rcv_wscale, 0xFFFF)

    def _options(self, now: float) -> bytes:
        """Options for a non-SYN segment: timestamps, then SACK blocks if holes exist."""
        opts = ts_option(self._ts_now(now), self._ts_recent) if self.ts_ok else b""
        if (self._ooo or self._dsack) and self.sack_ok:
            limit = _MAX_SACK_OPT_BLOCKS_TS if self.ts_ok else _MAX_SACK_OPT_BLOCKS
            blocks = []
            if self._dsack is not None:
                blocks.append(self._dsack)  # D-SACK first, sent once
                self._dsack = None
            if self._ooo:
                recent = sorted(self._ooo, key=lambda b: b[3], reverse=True)
                blocks += [(b[0], b[1]) for b in recent[:limit - len(blocks)]]
            opts += sack_option(blocks)
        return opts

    def _emit(self, seq: int, flags: int, opts: bytes, payload, window: int) -> None:
        """Build one IP packet (cached IP header + TCP header + options + payload) into the outbox."""
        hlen = 20 + len(opts)
        plen = len(payload) if payload is not None else 0
        tcp_len = hlen + plen
        ack = self.rcv_nxt & _M if flags & ACK else 0
        seq &= _M
        hdr = _pack_hdr(self.local_port, self.remote_port, seq, ack, hlen << 2, flags, window, 0, 0)
        # The checksum from residues of the parts: pseudo-header (precomputed, plus the length),
        # header and options, payload. The header is an even number of bytes, so the payload's
        # words line up; an odd payload is padded with a zero byte, i.e. times 256. Packet-sized
        # payloads are folded before the modulo (see checksum.residue, inlined: this runs per segment).
        r = _from_bytes(hdr, "big") + self._pseudo + tcp_len
        if opts:
            r += _from_bytes(opts, "big")
        if plen:
            x = _from_bytes(payload, "big")
            if plen >= _FOLD_MIN_BYTES:
                x = (x >> _FOLD_1) + (x & _MASK_1)
                x = (x >> _FOLD_2) + (x & _MASK_2)
            r += x % 0xFFFF << 8 if plen & 1 else x
        ck = 0xFFFF - r % 0xFFFF
        hdr = _pack_hdr(self.local_port, self.remote_port, seq, ack, hlen << 2, flags, window, ck, 0)
        iph = self._iphdr.header(tcp_len)
        if plen:
            pkt = b"".join((iph, hdr, opts, payload)) if opts else b"".join((iph, hdr, payload))
        else:
            pkt = iph + hdr + opts
        self.outbox.append(pkt)
        st = self.stats
        st.segments_sent += 1
        if flags & ACK:
            # Any ACK we send satisfies the delayed-ACK obligation.
            self._last_ack_sent = self.rcv_nxt
            self._unacked_segs = 0
            self._ack_now = False
            self._delack_deadline = None

    def _send_syn(self, now: float, with_ack: bool) -> None:
        opts = self.options
        ts = (self._ts_now(now), self._ts_recent if with_ack else 0) if (
            self.ts_ok if with_ack else opts.timestamps) else None
        if with_ack:
            ws = self.rcv_wscale if self._ws_ok else None
            sack = self.sack_ok
        else:
            ws = self.rcv_wscale if opts.window_scaling else None
            sack = opts.sack
        o = syn_options(self._our_mss, ws, sack, ts)
        wnd = min(self.recv_buffer_size - len(self._rcvbuf), 0xFFFF)
        if with_ack:
            self.rcv_adv = self.rcv_nxt + wnd
        self._emit(self.iss, SYN | ACK if with_ack else SYN, o, None, wnd)

    def _send_ack(self, now: float) -> None:
        st = self.state
        if st == _CLOSED or st == _SYN_SENT:
            return
        if st == _SYN_RECEIVED:
            self._send_syn(now, with_ack=True)
            return
        wnd = self._window_field()
        self._emit(self._ack_seq(), ACK, self._options(now), None, wnd)

    def _ack_seq(self) -> int:
        """Sequence number for segments without data: the highest we ever sent (after a
        go-back-N retransmission SND.NXT is behind what the peer already has, and a
        segment below its RCV.NXT would be dropped with the ACK in it), kept inside the
        peer's window."""
        seq = self.snd_max
        wnd_end = self.snd_una + self.snd_wnd
        if seq > wnd_end and self._was_established:
            seq = max(wnd_end, self.snd_una)
        return seq

    def _send_rst(self, seq: int, now: float) -> None:
        """RST+ACK at ``seq`` for our own connection (abort, data after close)."""
        self._emit(seq, RST | ACK, b"", None, 0)

    def _send_rst_for(self, seg: Segment) -> None:
        """RST answering an unacceptable segment (RFC 9293 §3.10.7 rules)."""
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            self._emit_raw_rst(seg.ack, 0, RST)
        else:
            n = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
            self._emit_raw_rst(0, (seg.seq + n) & _M, RST | ACK)

    def _emit_raw_rst(self, seq: int, ack: int, flags: int) -> None:
        pkt = self._iphdr.build(20)
        ipl = len(pkt)
        pkt += _pack_hdr(self.local_port, self.remote_port, seq & _M, ack & _M, 5 << 4, flags, 0, 0, 0)
        ck = _finish(self._pseudo + 20 + _partial(memoryview(pkt)[ipl:]))
        pkt[ipl + 16] = ck >> 8
        pkt[ipl + 17] = ck & 0xFF
        self.outbox.append(pkt)
        self.stats.segments_sent += 1

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 challenge ACK, rate limited per connection."""
        if now - self._challenge_time >= 1.0:
            self._challenge_time = now
            self._challenge_count = 0
        if self._challenge_count >= _CHALLENGE_ACK_LIMIT:
            return
        self._challenge_count += 1
        self.stats.challenge_acks += 1
        self._send_ack(now)

    def _send_data(self, seq: int, max_len: int, now: float, opts: bytes, wnd: int) -> int:
        """Send one segment of queued data (and/or our FIN) starting at ``seq``; returns its
        sequence-space length."""
        off = seq - self._buf_seq
        avail = len(self._sndbuf) - off
        n = max(min(max_len, avail), 0)
        flags = ACK
        fin_seq = self._fin_seq
        if fin_seq is not None and seq + n == fin_seq:
            flags |= FIN
        if n:
            if n == avail:
                flags |= PSH
            with memoryview(self._sndbuf) as mv:
                self._emit(seq, flags, opts, mv[off:off + n], wnd)
            self.stats.bytes_sent += n
        else:
            self._emit(seq, flags, opts, None, wnd)
        return n + (1 if flags & FIN else 0)

    def _output(self, now: float) -> None:
        """Send whatever the windows allow, then any ACK still owed."""
        if self.state in _SENDING_STATES:
            if self._in_recovery and self.sack_ok:
                self._sack_output(now)
            else:
                self._send_new(now)
        if self._ack_now:
            self._send_ack(now)

    def _send_new(self, now: float, extra: int = 0) -> None:
        """Send from SND.NXT as far as the peer's window, cwnd, Nagle and sender SWS
        avoidance allow: many segments per call, one memoryview over the send buffer."""
        sndbuf = self._sndbuf
        buf_seq = self._buf_seq
        data_end = buf_seq + len(sndbuf)
        fin_seq = self._fin_seq
        end = data_end + 1 if fin_seq is not None else data_end
        nxt = self.snd_nxt
        if nxt >= end:
            return
        una = self.snd_una
        snd_max = self.snd_max
        was_idle = snd_max <= una
        cwnd_end = una + self._cc.cwnd + extra
        wnd_end = una + self.snd_wnd
        opts = self._options(now)
        seg_max = self._seg_max(opts)
        wnd = self._window_field()
        nagle = self.options.nagle
        half_max_wnd = self.max_snd_wnd >> 1
        emit = self._emit
        start = nxt
        retransmitted = 0
        with memoryview(sndbuf) as mv:
            while nxt < end:
                if nxt < data_end:
                    remaining = data_end - nxt
                    n = seg_max
                    if remaining < n:
                        n = remaining
                    room = wnd_end - nxt
                    if room < n:
                        n = room
                    cwnd_left = cwnd_end - nxt
                    if cwnd_left < n:
                        n = cwnd_left
                    if n <= 0:
                        break
                    if n < seg_max and n < remaining:
                        # A partial segment: only if the receiver's window is what limits
                        # us and it is large (sender SWS avoidance), never for cwnd.
                        if n == cwnd_left or room < half_max_wnd:
                            break
                    if nagle and n < seg_max and nxt > una:
                        break
                    off = nxt - buf_seq
                    if n == remaining:
                        flags = ACK | PSH | FIN if fin_seq is not None else ACK | PSH
                    else:
                        flags = ACK
                    emit(nxt, flags, opts, mv[off:off + n], wnd)
                    if flags & FIN:
                        n += 1
                else:
                    # Only the FIN is left: it needs no window but must respect cwnd.
                    if cwnd_end <= nxt and nxt > una:
                        break
                    emit(nxt, ACK | FIN, opts, None, wnd)
                    n = 1
                if nxt < snd_max:
                    retransmitted += 1
                nxt += n
        if nxt == start:
            if nxt < end and nxt == una and self._rto_deadline is None and self._persist_deadline is None \
                    and wnd_end - nxt < min(self.send_mss, data_end - nxt):
                # Zero (or useless) window and nothing in flight: probe it later.
                self._persist_backoff = 0
                self._persist_deadline = now + self._clamped_rto(self._rto)
            return
        st = self.stats
        st.bytes_sent += min(nxt, data_end) - start
        if retransmitted:
            st.retransmits += retransmitted
        if self._rtt_seq is None and not self.ts_ok and nxt > snd_max:
            self._rtt_seq = nxt  # time this flight (Karn: only new data)
            self._rtt_time = now
        self.snd_nxt = nxt
        if nxt > snd_max:
            self.snd_max = nxt
            if self._rack:
                self._rk_record(start if start > snd_max else snd_max, nxt, now)
        if was_idle:
            self._progress_time = now
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto
            ut = self.options.user_timeout
            if ut is not None:
                self._rto_deadline = min(self._rto_deadline, self._progress_time + ut)
        self._persist_deadline = None
        if self._rack:
            self._tlp_arm(now)

    def _seg_max(self, opts: bytes) -> int:
        """Payload that fits one segment carrying ``opts`` (RFC 6691: options count)."""
        return self.send_mss - (len(opts) - (12 if self.ts_ok else 0))

    def _clamped_rto(self, rto: float) -> float:
        return min(max(rto, self.options.min_rto), self.options.max_rto)

    # --- SACK recovery (RFC 6675) ---

    def _sack_add(self, blocks: list[tuple[int, int]]) -> bool:
        """Merge the peer's SACK blocks into the scoreboard; True if anything new."""
        una = self.snd_una
        mx = self.snd_max
        changed = False
        for l_wire, r_wire in blocks:
            left = _unwrap(l_wire, una)
            right = _unwrap(r_wire, una)
            if right <= una or right > mx or left >= right:
                continue  # D-SACK or bogus: ignore
            if left < una:
                left = una
            sb = self._sacked
            # Insert and merge (the list is short: one entry per hole at the receiver).
            i = 0
            while i < len(sb) and sb[i][1] < left:
                i += 1
            j = i
            new_l, new_r = left, right
            while j < len(sb) and sb[j][0] <= right:
                new_l = min(new_l, sb[j][0])
                new_r = max(new_r, sb[j][1])
                j += 1
            if i == j and len(sb) >= _MAX_SACK_SCOREBOARD:
                continue  # would be one more separate range: ignored (see _MAX_SACK_SCOREBOARD)
            covered = sum(b[1] - b[0] for b in sb[i:j])
            if new_r - new_l != covered:
                changed = True
                sb[i:j] = [[new_l, new_r]]
                self._sacked_bytes += (new_r - new_l) - covered
        return changed

    def _sack_trim(self) -> None:
        una = self.snd_una
        sb = self._sacked
        while sb and sb[0][0] < una:
            if sb[0][1] <= una:
                self._sacked_bytes -= sb[0][1] - sb[0][0]
                del sb[0]
            else:
                self._sacked_bytes -= una - sb[0][0]
                sb[0][0] = una
                break

    def _holes(self):
        """Yield (start, end, sacked_bytes_above_start) for every unSACKed range below
        the highest SACKed byte."""
        prev = self.snd_una
        above = self._sacked_bytes
        for s, e in self._sacked:
            if s > prev:
                yield prev, s, above
            above -= e - s
            prev = e

    def _pipe(self) -> int:
        """RFC 6675 pipe: bytes believed in flight."""
        # With RACK, holes below _rk_lost_to are lost by time; the RFC 6675 "three
        # segments SACKed above" rule stays as well until reordering has been seen.
        lost_thresh = (_DUPTHRESH - 1) * self.send_mss
        if self._rack and self._rk_reord:
            lost_thresh = 1 << 62
        rack_lost = self._rk_lost_to
        high_rxt = self._high_rxt
        pipe = 0
        top = self.snd_una
        for s, e, above in self._holes():
            if above <= lost_thresh:
                pipe += e - (s if s >= rack_lost else min(e, rack_lost))
            if s < high_rxt:
                pipe += min(e, high_rxt) - s
        if self._sacked:
            top = self._sacked[-1][1]
        if self.snd_nxt > top:
            pipe += self.snd_nxt - top
        return pipe

    def _next_seg(self) -> tuple[int, int] | None:
        """RFC 6675 NextSeg(): (start, max_len) to (re)send, or None."""
        lost_thresh = (_DUPTHRESH - 1) * self.send_mss
        if self._rack and self._rk_reord:
            lost_thresh = 1 << 62
        rack_lost = self._rk_lost_to
        high_rxt = self._high_rxt
        rescue = None
        for s, e, above in self._holes():
            if e <= high_rxt:
                continue
            s = max(s, high_rxt)
            if s < rack_lost:
                return s, min(e, rack_lost) - s
            if above > lost_thresh:
                return s, e - s
            if rescue is None:
                rescue = (s, e - s)
        data_end = self._buf_seq + len(self._sndbuf)
        end = data_end + (1 if self._fin_seq is not None else 0)
        nxt = self.snd_nxt
        if nxt < end and (nxt >= data_end or nxt < self.snd_una + self.snd_wnd):
            return nxt, max(min(data_end, self.snd_una + self.snd_wnd) - nxt, 0)
        return rescue

    def _sack_output(self, now: float) -> None:
        cwnd = self._cc.cwnd
        pipe = self._pipe()
        opts = self._options(now)
        seg_max = self._seg_max(opts)
        wnd = self._window_field()
        sent = False
        while cwnd - pipe >= self.send_mss:
            nxt_seg = self._next_seg()
            if nxt_seg is None:
                break
            seq, room = nxt_seg
            if seq < self.snd_nxt:
                used = self._send_data(seq, min(seg_max, room), now, opts, wnd)
                if self._rack:
                    self._rk_rxt_add(seq, seq + used, now)
                self.stats.retransmits += 1
                self._high_rxt = seq + used
                self._rxt_mark = self.snd_max
                if seq == self.snd_una:
                    self._una_rxt_time = now
                self._rtt_seq = None  # Karn
            else:
                if room <= 0 and seq < self._buf_seq + len(self._sndbuf):
                    break
                used = self._send_data(seq, min(seg_max, room), now, opts, wnd)
                self.snd_nxt = seq + used
                if self.snd_nxt > self.snd_max:
                    if self._rack:
                        self._rk_record(max(seq, self.snd_max), self.snd_nxt, now)
                    self.snd_max = self.snd_nxt
            if used <= 0:
                break
            pipe += used
            sent = True
        if sent:
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
            if self._rack:
                self._tlp_arm(now)

    def _enter_recovery(self, now: float) -> None:
        flight = self.snd_max - self.snd_una
        cc = self._cc
        cc.on_congestion(flight, now)
        self._in_recovery = True
        self._recover = self.snd_max
        self._high_rxt = self.snd_una
        self._rxt_mark = self.snd_max
        self._una_rxt_time = now
        self.stats.fast_retransmits += 1
        self._rtt_seq = None
        self._tlp_deadline = None  # no probes during recovery; a new episode starts after it
        self._tlp_high = None
        if self.sack_ok:
            cc.cwnd = cc.ssthresh
            # Fast retransmit of the first hole, then whatever pipe allows.
            opts = self._options(now)
            used = self._send_data(self.snd_una, self._seg_max(opts), now, opts, self._window_field())
            if self._rack:
                self._rk_rxt_add(self.snd_una, self.snd_una + used, now)
            self.stats.retransmits += 1
            self._high_rxt = self.snd_una + used
            self._sack_output(now)
        else:
            cc.cwnd = cc.ssthresh + 3 * self.send_mss
            opts = self._options(now)
            self._send_data(self.snd_una, self._seg_max(opts), now, opts, self._window_field())
            self.stats.retransmits += 1
        self._rto_deadline = now + self._rto
        if self._rack:
            self._tlp_arm(now)
        self._update_stats()

    # --- RACK-TLP (RFC 8985) ---

    def _rk_record(self, start: int, end: int, now: float) -> None:
        """Remember when original data [start, end) went out (one entry per send call)."""
        ends = self._rk_end
        key = (now, self._rk_clock)
        if ends and ends[-1] == start and self._rk_time[-1] == key:
            ends[-1] = end
        else:
            self._rk_start.append(start)
            ends.append(end)
            self._rk_time.append(key)

    def _rk_rxt_add(self, start: int, end: int, now: float) -> None:
        """Remember a retransmission of [start, end): after everything sent before it."""
        self._rk_clock += 1
        self._rk_rxt.append([start, end, (now, self._rk_clock)])
        self._rk_clock += 1

    def _rk_orig_time(self, seq: int) -> tuple[float, int] | None:
        """When the original transmission of byte ``seq`` went out (None if unknown)."""
        ends = self._rk_end
        i = bisect_right(ends, seq)
        if i < len(ends) and self._rk_start[i] <= seq:
            return self._rk_time[i]
        return None

    def _rack_reset(self) -> None:
        """Forget RACK/TLP state (after an RTO everything is resent go-back-N)."""
        self._rk_start.clear()
        self._rk_end.clear()
        self._rk_time.clear()
        self._rk_rxt.clear()
        self._rk_xmit_ts = None
        self._rk_lost_to = self.snd_una
        self._rk_deadline = None
        self._tlp_deadline = None
        self._tlp_high = None

    def _rack_dsack(self, blocks: list[tuple[int, int]], una: int) -> None:
        """A D-SACK (RFC 2883: first block below SND.UNA or inside the second) means data
        arrived twice: reordering (or a needless probe). Widen the reordering window
        once per round trip and keep it for a while (RFC 8985 §6.2 step 4)."""
        l0 = _unwrap(blocks[0][0], una)
        r0 = _unwrap(blocks[0][1], una)
        if not (r0 <= una or (len(blocks) > 1 and _unwrap(blocks[1][0], una) <= l0
                              and r0 <= _unwrap(blocks[1][1], una))):
            return
        self._rk_reord = True
        self.stats.reordering_seen = True
        rnd = self._rk_dsack_round
        if rnd is None or una >= rnd:
            self._rk_dsack_round = self.snd_max
            self._rk_mult += 1
            self._rk_persist = _REO_WND_PERSIST

    def _rack_update(self, ack: int, had_sacked: bool, now: float) -> None:
        """Newly ACKed/SACKed data: advance RACK.xmit_ts to the most recently sent
        delivered segment (RFC 8985 §6.2 steps 1-3), then look for losses."""
        una = self.snd_una
        cands = []
        sb = self._sacked
        if ack > una:
            t = self._rk_orig_time(ack - 1)
            if t is not None:
                cands.append((t, ack))
            if had_sacked and sb and not self._in_recovery and una >= self._rto_recover and not self._rk_rxt \
                    and ack <= sb[0][0]:
                # A hole below SACKed data filled without our retransmitting it: reordering.
                self._rk_reord = True
                self.stats.reordering_seen = True
        if sb:
            right = sb[-1][1]
            t = self._rk_orig_time(right - 1)
            if t is not None:
                cands.append((t, right))
        rxt = self._rk_rxt
        if rxt:
            min_rtt = self._min_rtt
            fin_seq = self._fin_seq
            keep = []
            for r in rxt:
                s, e, t = r
                done = e <= ack
                if not done:
                    if fin_seq is not None and s < fin_seq < e:
                        e = fin_seq  # SACK blocks cover data only, never the FIN
                    for bs, be in sb:
                        if bs <= s and e <= be:
                            done = True
                            break
                        if bs > s:
                            break
                if not done:
                    keep.append(r)
                elif min_rtt is None or now - t[0] >= min_rtt:
                    # (A delivery sooner than min RTT answered the original, not this copy.)
                    cands.append((t, e))
            if len(keep) != len(rxt):
                self._rk_rxt = keep
        xt = self._rk_xmit_ts
        for t, e in cands:
            if xt is None or t > xt or (t == xt and e > self._rk_end_seq):
                xt = self._rk_xmit_ts = t
                self._rk_end_seq = e
                self._rk_rtt = now - t[0]
        if sb:
            self._rack_detect(now)

    def _rack_reo_wnd(self) -> float:
        if not self._rk_reord and (self._in_recovery or self._sacked_bytes >= _DUPTHRESH * self.send_mss):
            return 0.0
        m = self._min_rtt if self._min_rtt is not None else (self._srtt or 0.0)
        w = self._rk_mult * m / 4
        if self._srtt is not None and w > self._srtt:
            w = self._srtt
        return w

    def _rack_detect(self, now: float) -> None:
        """RFC 8985 §6.2 step 5: data sent before RACK's segment and not delivered
        within RACK.rtt + reo_wnd is lost; arm the reordering timer for the rest."""
        xt = self._rk_xmit_ts
        if xt is None:
            return
        reo = self._rack_reo_wnd()
        rtt = self._rk_rtt
        limit = now - rtt - reo + 1e-9
        end_seq = self._rk_end_seq
        una = self.snd_una
        lost_to = self._rk_lost_to
        if lost_to < una:
            lost_to = una
        deadline = None
        starts, ends, times = self._rk_start, self._rk_end, self._rk_time
        i = bisect_right(ends, lost_to)
        n = len(ends)
        prev = lost_to
        while i < n:
            s = starts[i]
            if s > prev:
                break  # a gap in the record (e.g. a window probe): no timing known
            t = times[i]
            if t > xt:
                break
            e = ends[i]
            if t == xt and e > end_seq:
                e = end_seq
            if e <= lost_to:
                break
            if t[0] <= limit:
                lost_to = e
                prev = e
                if e != ends[i]:
                    break
                i += 1
            else:
                # Not lost yet: only worth a timer if an unSACKed hole lies below e.
                for hs, he, _ in self._holes():
                    if he > lost_to and hs < e:
                        deadline = t[0] + rtt + reo
                        break
                    if hs >= e:
                        break
                break
        rxt = self._rk_rxt
        if rxt:
            lost_rxt = 0
            for s, e, t in rxt:
                if t > xt or (t == xt and e > end_seq):
                    break
                if t[0] <= limit:
                    lost_rxt += 1
                    if s < self._high_rxt:
                        self._high_rxt = max(s, una)
                    if e > lost_to:
                        lost_to = e
                else:
                    d = t[0] + rtt + reo
                    if deadline is None or d < deadline:
                        deadline = d
                    break
            if lost_rxt:
                # A retransmission sent before a delivered segment is lost too.
                del rxt[:lost_rxt]
                self.stats.lost_retransmits += lost_rxt
        old = self._rk_lost_to
        if lost_to > old:
            for hs, he, _ in self._holes():
                if hs >= lost_to:
                    break
                if he > old:
                    self.stats.rack_marks += 1  # a hole newly counted lost
                    break
            self._rk_lost_to = lost_to
        self._rk_deadline = deadline

    def _rack_enter_recovery(self, now: float) -> None:
        if self._in_recovery or self.snd_una < self._recover or self.snd_una <= self._rto_recover \
                or self._persist_deadline is not None or self.snd_max <= self.snd_una:
            return
        self._enter_recovery(now)

    def _tlp_arm(self, now: float) -> None:
        """Arm the tail loss probe (RFC 8985 §7.2): 2*SRTT after the last send, plus the
        peer's delayed-ACK allowance when a single segment is in flight; not when the
        RTO would come first, after an RTO, or while one probe is out. Unlike the RFC,
        also once per fast recovery: a lost retransmission with nothing sent after it
        gives RACK nothing to compare with, and would otherwise wait for the RTO."""
        una = self.snd_una
        srtt = self._srtt
        if self._tlp_high is not None or self.snd_max <= una or srtt is None \
                or una < self._rto_recover or self._persist_deadline is not None or self.snd_nxt < self.snd_max:
            self._tlp_deadline = None
            return
        extra = _TLP_MIN_EXTRA
        if self.snd_max - una <= self.send_mss and self.options.delayed_ack > extra:
            extra = self.options.delayed_ack
        d = now + 2 * srtt + extra
        rto = self._rto_deadline
        self._tlp_deadline = d if rto is None or d < rto else None

    def _on_tlp(self, now: float) -> None:
        """Send the probe: one segment of new data if the window allows, else the last
        segment again, so the peer's (S)ACK shows what is missing at the tail. In fast
        recovery: the first hole again (its retransmission is overdue)."""
        if self.state not in (TCPState.ESTABLISHED, TCPState.CLOSE_WAIT, TCPState.FIN_WAIT_1,
                              TCPState.LAST_ACK, TCPState.CLOSING) \
                or self.snd_max <= self.snd_una or self._tlp_high is not None:
            return
        una = self.snd_una
        data_end = self._buf_seq + len(self._sndbuf)
        fin_seq = self._fin_seq
        end = data_end + 1 if fin_seq is not None else data_end
        opts = self._options(now)
        seg_max = self._seg_max(opts)
        wnd = self._window_field()
        nxt = self.snd_nxt
        sent_new = False
        in_recovery = self._in_recovery
        if in_recovery:
            sb = self._sacked
            hole_end = sb[0][0] if sb and sb[0][0] > una else min(self.snd_max, data_end)
            used = self._send_data(una, max(min(seg_max, hole_end - una), 0), now, opts, wnd)
            self.stats.retransmits += 1
            self._rk_rxt_add(una, una + used, now)
            if self._high_rxt < una + used:
                self._high_rxt = una + used
        elif nxt == self.snd_max and nxt < end:
            room = una + self.snd_wnd - nxt
            if nxt >= data_end or room > 0:
                used = self._send_data(nxt, min(seg_max, max(room, 0)), now, opts, wnd)
                if used > 0:
                    self.snd_nxt = self.snd_max = nxt + used
                    self._rk_record(nxt, nxt + used, now)
                    sent_new = True
        if not sent_new and not in_recovery:
            data_top = min(self.snd_max, data_end)
            start = max(una, data_top - seg_max)
            used = self._send_data(start, data_top - start, now, opts, wnd)
            self.stats.retransmits += 1
            self._rk_rxt_add(start, start + used, now)
            self._rtt_seq = None  # Karn
        self._tlp_high = self.snd_max
        self._tlp_rxt = not sent_new
        self._tlp_ts = self._ts_now(now)
        self.stats.tlp_probes += 1
        self._rto_deadline = now + self._rto
        ut = self.options.user_timeout
        if ut is not None:
            self._rto_deadline = min(self._rto_deadline, self._progress_time + ut)

    # --- RTT / RTO ---

    def _rtt_sample(self, r: float, per_ack: bool = False) -> None:
        """RFC 6298 estimator. ``per_ack`` samples (timestamps give one per ACK) use gains
        divided by the samples expected per RTT (RFC 7323 appendix G), so SRTT and
        RTTVAR keep the memory of about one RTT as with one sample per flight."""
        if r < 0:
            return
        if self._min_rtt is None or r < self._min_rtt:
            self._min_rtt = r
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            alpha = 0.125
            beta = 0.25
            if per_ack:
                expected = (self.snd_max - self.snd_una) // (2 * self.send_mss) + 1
                if expected > 1:
                    alpha /= expected
                    beta /= expected
            self._rttvar = (1 - beta) * self._rttvar + beta * abs(self._srtt - r)
            self._srtt = (1 - alpha) * self._srtt + alpha * r
        self._rto = self._clamped_rto(self._srtt + max(_RTO_GRANULARITY, 4 * self._rttvar))

    def _update_stats(self) -> None:
        st = self.stats
        st.srtt = self._srtt
        st.rto = self._rto
        st.cwnd = self._cc.cwnd
        st.ssthresh = self._cc.ssthresh

    # --- input ---

    def _receive(self, seg: Segment, now: float) -> None:
        st = self.state
        flags = seg.flags
        if st == _CLOSED:
            self.stats.dropped += 1
            return
        if st == _SYN_SENT:
            self._receive_syn_sent(seg, now)
            return
        # Fast path: in-order data or a plain ACK in ESTABLISHED, nothing unusual going on.
        if st == _ESTABLISHED and (flags & _FAST_FLAGS_MASK) == ACK and seg.sack_blocks is None \
                and not self._ooo and not self._in_recovery and seg.seq == (self.rcv_nxt & _M) \
                and self._fast_path(seg, now):
            return
        self._last_rcv_time = now
        payload = seg.payload
        plen = len(payload)
        seq = _unwrap(seg.seq, self.rcv_nxt)

        if st == TCPState.SYN_RECEIVED and flags & SYN and seg.seq == self.irs:
            if flags & ACK and not flags & RST and _unwrap(seg.ack, self.snd_una) == self.snd_nxt:
                # Simultaneous open: the peer's SYN-ACK completes our side too.
                self._take_syn_ack_window(seg)
                self.snd_una = self.snd_nxt
                self._rto_deadline = None
                self._become_established(now)
                self._send_ack(now)
                self._output(now)
            elif not flags & (ACK | RST):
                self._send_syn(now, with_ack=True)  # retransmitted SYN: repeat the SYN-ACK
            else:
                self.stats.dropped += 1
            return

        # PAWS (RFC 7323 §5): drop segments with an older timestamp than TS.Recent.
        if self.ts_ok and seg.has_ts and not flags & RST:
            if ((seg.tsval - self._ts_recent) & _M) >= _HALF and now - self._ts_recent_time < _PAWS_IDLE:
                self.stats.dropped += 1
                self._send_ack(now)
                return

        # Acceptability test (RFC 9293 §3.10.7.4).
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        rnxt = self.rcv_nxt
        wnd = self.rcv_adv - rnxt
        if wnd < 0:
            wnd = 0
        if seg_len == 0:
            ok = seq == rnxt if wnd == 0 else rnxt <= seq < rnxt + wnd
        elif wnd == 0:
            ok = seq == rnxt  # processed for its ACK/RST/FIN-less control info only; data trimmed
        else:
            ok = (rnxt <= seq < rnxt + wnd) or (rnxt <= seq + seg_len - 1 < rnxt + wnd)
        if not ok:
            self.stats.dropped += 1
            if flags & SYN and not flags & RST:
                # RFC 5961 §4.2: a SYN in a synchronized state gets a (rate-limited) challenge ACK
                # whatever its sequence number.
                self._challenge_ack(now)
                return
            if not flags & RST:
                if plen and seq + plen <= rnxt and self.sack_ok:
                    self._dsack = (seq, seq + plen)
                if st == TCPState.TIME_WAIT and flags & FIN:
                    self._state_deadline = now + self.options.time_wait  # re-ACK, restart 2MSL
                self._send_ack(now)
            return

        # RST (RFC 5961 §3).
        if flags & RST:
            if seq != rnxt:
                self._challenge_ack(now)
                return
            if st == TCPState.TIME_WAIT:
                return  # RFC 1337: ignore
            if st == TCPState.SYN_RECEIVED:
                err = (ConnectionResetError(errno.ECONNRESET, "connection reset by peer") if self._passive
                       else ConnectionRefusedError(errno.ECONNREFUSED, "connection refused"))
            elif st in (TCPState.CLOSING, TCPState.LAST_ACK):
                err = None
            else:
                err = ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
            self._enter_closed(err)
            return

        # SYN in a synchronized state (RFC 5961 §4): challenge ACK, never reset.
        if flags & SYN:
            self._challenge_ack(now)
            return

        if not flags & ACK:
            self.stats.dropped += 1
            return

        # Timestamps: remember TS.Recent (RFC 7323 §4.3).
        if self.ts_ok and seg.has_ts and seq <= self._last_ack_sent:
            # (After 24 days without an update TS.Recent is no longer valid (RFC 7323 §5.5): the
            # segment PAWS let through on that ground sets it, even if its TSval looks older.)
            if ((seg.tsval - self._ts_recent) & _M) < _HALF or now - self._ts_recent_time >= _PAWS_IDLE:
                self._ts_recent = seg.tsval
                self._ts_recent_time = now

        ack = _unwrap(seg.ack, self.snd_una)
        if st == TCPState.SYN_RECEIVED:
            if not (self.snd_una < ack <= self.snd_max):
                self._send_rst_for(seg)
                return
            self._become_established(now)
            self.snd_wl1 = seq - 1  # so this ACK's window is taken
        if not self._process_ack(seg, seq, ack, now):
            return
        st = self.state
        if st == TCPState.CLOSED:
            return

        # Data and FIN.
        if plen or flags & FIN:
            if st in (TCPState.ESTABLISHED, TCPState.FIN_WAIT_1, TCPState.FIN_WAIT_2):
                if self._app_closed and plen and seq + plen > rnxt:
                    # Nobody will ever read this (RFC 9293 §3.6 / RFC 2525).
                    self._send_rst(self.snd_max, now)
                    self._enter_closed(None)
                    return
                self._process_data(seg, seq, payload, now)
            elif st == TCPState.TIME_WAIT and flags & FIN:
                self._state_deadline = now + self.options.time_wait
                self._ack_now = True
        self._output(now)
        if self._unacked_segs and not self._ack_now and self._delack_deadline is None:
            self._delack_deadline = now + self.options.delayed_ack

    def _fast_path(self, seg: Segment, now: float) -> bool:
        """Process a segment at exactly RCV.NXT whose flags are ACK (and maybe PSH); False
        (with nothing changed) if it needs the full rules after all."""
        if seg.has_ts:
            return self._fast_fields(seg.ack, seg.window, seg.tsval, seg.tsecr, seg.payload, now)
        return self._fast_fields(seg.ack, seg.window, None, None, seg.payload, now)

    def receive_fast(self, seq: int, ack: int, flags: int, window: int, tsval: int, tsecr: int,
                     payload: memoryview, now: float) -> bool:
        """The common segment, pre-parsed by the stack: ACK (maybe PSH) with the usual timestamp
        option and no other option, at exactly RCV.NXT of an ESTABLISHED connection.

        Returns False, with nothing changed, when the segment needs the general rules:
        the caller then parses it and calls :meth:`receive_segment`. Never raises.
        """
        if self.state is not _ESTABLISHED or (flags & _FAST_FLAGS_MASK) != ACK or self._ooo \
                or self._in_recovery or seq != (self.rcv_nxt & _M) or not self.ts_ok:
            return False
        try:
            if not self._fast_fields(ack, window, tsval, tsecr, payload, now):
                return False
        except Exception:  # as in receive_segment: counted, the segment is dropped
            self.internal_errors += 1
            self.stats.dropped += 1
        self.stats.segments_received += 1
        return True

    def receive_fast_run(self, items: list, start: int, now: float) -> int:
        """Consume a run of consecutive pre-parsed segments ``items[start:]`` in one step; returns how many.

        Each item is ``(header, packet)``: an IPv4 packet with a 20-byte IP header and a 32-byte TCP
        header in the usual timestamp layout, and that TCP header unpacked as ``(sport, dport, seq,
        ack, flags, window, option word, tsval, tsecr)``; the payload starts at byte 52.
        This is what a bulk receiver sees between two of its ACKs: in-order data segments that all
        carry the same ACK while we have nothing to send. Their per-segment effects are applied as
        :meth:`receive_fast` would apply them one by one (the same buffer, window, timestamp, ACK
        and timer outcome), with the bookkeeping done once. The run stops at the first segment
        that does not fit that shape, and after the one that makes an ACK due (which is sent);
        0 means the caller must take ``items[start]`` one at a time. Never raises.
        """
        if self.state is not _ESTABLISHED or self._ooo or self._in_recovery or not self.ts_ok \
                or self._persist_deadline is not None:
            return 0
        if self.snd_nxt < self._buf_seq + len(self._sndbuf) + (self._fin_seq is not None):
            return 0  # we have data to send: ACKs ride on it, segment by segment
        rnxt = self.rcv_nxt
        if self.snd_wl1 > rnxt:
            return 0
        first = items[start][0]
        ack_raw = first[3]
        una = self.snd_una
        ack = _unwrap(ack_raw, una)
        if ack < una or ack > self.snd_max:
            return 0
        # Walk the run on locals: what the per-segment path would check and change.
        space = self.rcv_adv - rnxt
        last_ack_sent = self._last_ack_sent
        ts_recent = self._ts_recent
        ts_recent_set = False
        full = self._rcv_full
        our_mss = self._our_mss
        unacked = self._unacked_segs
        threshold = _ACK_STRETCH if self.coalesce_acks else 4
        rtt_tsecr = self._rcv_rtt_tsecr
        rtt_samples: list[tuple[int, int]] = []
        max_wnd = self.max_snd_wnd
        wscale = self.snd_wscale
        expect = rnxt & _M
        pos = rnxt
        total = 0
        n = 0
        last_window = 0
        ack_due = False
        for i in range(start, len(items)):
            h, packet = items[i]
            _sp, _dp, seq, a, flags, window, _layout, tsval, tsecr = h
            plen = len(packet) - 52
            if seq != expect or a != ack_raw or (flags & _FAST_FLAGS_MASK) != ACK or not plen \
                    or ((tsval - ts_recent) & _M) >= _HALF or total + plen > space:
                break
            if pos <= last_ack_sent:
                ts_recent = tsval
                ts_recent_set = True
            wnd = window << wscale
            if wnd > max_wnd:
                max_wnd = wnd
            last_window = window
            if plen >= full:
                if plen > full and plen <= our_mss:
                    full = plen
                unacked += 2
            else:
                unacked += 1
            if tsecr != rtt_tsecr:
                rtt_samples.append((tsecr, pos + plen))
                rtt_tsecr = tsecr
            total += plen
            pos += plen
            expect = pos & _M
            n += 1
            if unacked >= threshold:
                ack_due = True
                break
        if n < 2 and not (n == 1 and ack_due):
            return 0  # nothing gained over the per-segment path
        try:
            self._last_rcv_time = now
            if ts_recent_set:
                self._ts_recent = ts_recent
                self._ts_recent_time = now
            self.snd_wnd = last_window << wscale
            self.max_snd_wnd = max_wnd
            self.snd_wl1 = pos - (len(items[start + n - 1][1]) - 52)
            self.snd_wl2 = ack
            if ack > una:
                self._ack_new(first[8], ack, now)  # only the first segment moves SND.UNA
            rcvbuf = self._rcvbuf
            chunks = rcvbuf._chunks  # (ReceiveBuffer.append's common case, inlined)
            small = 0  # payload bytes that went through rcvbuf.append (which counts them itself)
            view_min = _VIEW_MIN + 52
            for i in range(start, start + n):
                packet = items[i][1]  # bytes (the stack's fast path takes nothing else)
                if len(packet) >= view_min:
                    chunks.append(memoryview(packet)[52:])
                else:
                    small += len(packet) - 52
                    rcvbuf.append(memoryview(packet)[52:])
            rcvbuf._size += total - small
            self.rcv_nxt = pos
            self.stats.bytes_received += total
            self._notify()
            self._rcv_full = full
            self._unacked_segs = unacked
            if ack_due:
                self._ack_now = True
            for tsecr, at in rtt_samples:
                self._rcv_rtt_update(tsecr, at, now)
            if self._ack_now:
                self._output(now)
            if self._unacked_segs and not self._ack_now and self._delack_deadline is None:
                self._delack_deadline = now + self.options.delayed_ack
        except Exception:  # as in receive_segment: counted, the segments are dropped
            self.internal_errors += 1
            self.stats.dropped += n
        self.stats.segments_received += n
        return n

    def _fast_fields(self, seg_ack: int, window: int, tsval: int | None, tsecr: int | None,
                     payload: memoryview, now: float) -> bool:
        """The fast path on the segment's fields (``tsval``/``tsecr`` None: no timestamp option)."""
        rnxt = self.rcv_nxt
        ts_ok = self.ts_ok
        if ts_ok and (tsval is None or ((tsval - self._ts_recent) & _M) >= _HALF):
            return False
        plen = len(payload)
        if plen > self.rcv_adv - rnxt or self._persist_deadline is not None or self.snd_wl1 > rnxt:
            return False
        una = self.snd_una
        snd_max = self.snd_max
        ack = _unwrap(seg_ack, una)
        if ack < una or ack > snd_max or (ack == una and not plen and snd_max > una):
            return False  # old, impossible, or possibly a duplicate ACK
        self._last_rcv_time = now
        if ts_ok and rnxt <= self._last_ack_sent:
            self._ts_recent = tsval
            self._ts_recent_time = now
        wnd = window << self.snd_wscale
        self.snd_wnd = wnd
        if wnd > self.max_snd_wnd:
            self.max_snd_wnd = wnd
        self.snd_wl1 = rnxt
        self.snd_wl2 = ack
        if ack > una:
            self._ack_new(tsecr, ack, now)
        if plen:
            if plen >= _VIEW_MIN and payload.__class__ is memoryview and payload.obj.__class__ is bytes:
                rb = self._rcvbuf  # (ReceiveBuffer.append's common case, inlined: this runs per segment)
                rb._chunks.append(payload)
                rb._size += plen
            else:
                self._rcvbuf.append(payload)
            self.rcv_nxt = rnxt + plen
            self.stats.bytes_received += plen
            self._notify()
            full = self._rcv_full
            if plen >= full:
                if plen > full and plen <= self._our_mss:
                    self._rcv_full = plen
                self._unacked_segs += 2
            else:
                self._unacked_segs += 1
            if self._unacked_segs >= (_ACK_STRETCH if self.coalesce_acks else 4):
                self._ack_now = True
            if tsecr is None or tsecr != self._rcv_rtt_tsecr:  # one sample per echoed timestamp
                self._rcv_rtt_update(tsecr, rnxt + plen, now)
        # _output only if it has work: an ACK owed, or data/FIN not sent yet (a pure
        # receiver skips two calls per segment).
        if self._ack_now or self.snd_nxt < self._buf_seq + len(self._sndbuf) + (self._fin_seq is not None):
            self._output(now)
        if self._unacked_segs and not self._ack_now and self._delack_deadline is None:
            self._delack_deadline = now + self.options.delayed_ack
        return True

    def _take_syn_ack_window(self, seg: Segment) -> None:
        self.snd_wnd = seg.window
        self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)

    def _receive_syn_sent(self, seg: Segment, now: float) -> None:
        flags = seg.flags
        ack = None
        if flags & ACK:
            ack = _unwrap(seg.ack, self.snd_una)
            if ack <= self.iss or ack > self.snd_max:
                self.stats.dropped += 1
                self._send_rst_for(seg)
                return
        if flags & RST:
            if ack is not None:
                self._enter_closed(ConnectionRefusedError(errno.ECONNREFUSED, "connection refused"))
            else:
                self.stats.dropped += 1
            return
        if not flags & SYN:
            self.stats.dropped += 1
            return
        self._last_rcv_time = now
        self._take_syn(seg, now)
        if ack is not None:
            self.snd_una = ack
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
            if self.ts_ok and seg.tsecr:
                self._rtt_sample(((self._ts_now(now) - seg.tsecr) & _M) / _TS_HZ)
            elif self._rtt_seq is not None:
                self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
            self._rto_deadline = None
            self._retries = 0
            self._become_established(now)
            self._update_stats()
            self._ack_now = True
            if seg.payload or flags & FIN:
                # Data (and FIN) on the SYN-ACK are processed like any other (RFC 9293 §3.10.7.3),
                # within the window our SYN offered.
                self.rcv_adv = self.rcv_nxt + min(self.recv_buffer_size, 0xFFFF)
                self._process_data(seg, self.rcv_nxt, seg.payload, now)
            self._output(now)
        else:
            # Simultaneous open (RFC 9293 §3.5, figure 8).
            self.state = TCPState.SYN_RECEIVED
            self._send_syn(now, with_ack=True)

    def _process_ack(self, seg: Segment, seq: int, ack: int, now: float) -> bool:
        """ACK field processing; False if the segment must be dropped."""
        una = self.snd_una
        if ack > self.snd_max or ack < una - self.max_snd_wnd:
            # RFC 5961 §5.2: only (SND.UNA - MAX.SND.WND) <= SEG.ACK <= SND.NXT is acceptable (SND.MAX
            # here: after go-back-N SND.NXT is behind what was sent); anything else, data included, is
            # dropped with a (rate-limited) challenge ACK. This stops blind data injection.
            self.stats.dropped += 1
            self._challenge_ack(now)
            return False
        wnd = seg.window << self.snd_wscale
        # Window update (RFC 9293 SND.WL1/WL2 rule).
        window_changed = False
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            if wnd != self.snd_wnd:
                window_changed = True
                self.snd_wnd = wnd
                if wnd > self.max_snd_wnd:
                    self.max_snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
        sack_new = False
        blocks = seg.sack_blocks
        had_sacked = bool(self._sacked)
        if blocks and self.sack_ok:
            if self._rack:
                self._rack_dsack(blocks, una)
            sack_new = self._sack_add(blocks)
            if sack_new and not self._rack and self._in_recovery and self._high_rxt > self.snd_una and self._sacked and (
                    self._sacked[-1][1] > self._rxt_mark + (_DUPTHRESH - 1) * self.send_mss
                    or (ack == una and self._srtt is not None
                        and now - self._una_rxt_time > 1.25 * self._srtt + 0.002)):
                # A retransmitted hole is still open while the peer keeps SACKing data
                # sent after it (FIFO path), or its retransmission has gone unanswered
                # for more than an RTT while ACKs keep coming: that retransmission was
                # lost too. Make the holes eligible again instead of waiting for the RTO.
                self._high_rxt = self.snd_una
                self._rxt_mark = self.snd_max
                self._una_rxt_time = now
                self.stats.lost_retransmits += 1
        if self._rack and (sack_new or (ack > una and self._sacked)):
            self._rack_update(ack, had_sacked, now)
        cc = self._cc
        if ack > una:
            self._ack_new(seg.tsecr if seg.has_ts else None, ack, now)
            if self._rack and not self._in_recovery and self._rk_lost_to > self.snd_una:
                self._rack_enter_recovery(now)
            # Our FIN acknowledged?
            fin_seq = self._fin_seq
            if fin_seq is not None and ack > fin_seq:
                st = self.state
                if st == TCPState.FIN_WAIT_1:
                    self.state = TCPState.FIN_WAIT_2
                    if self._app_closed:
                        self._state_deadline = now + self.options.fin_wait_2_timeout
                    self._notify()
                elif st == TCPState.CLOSING:
                    self._enter_time_wait(now)
                elif st == TCPState.LAST_ACK:
                    self._enter_closed(None)
                    return False
        elif ack == una and self.snd_max > una and not len(seg.payload) and not seg.flags & (FIN | SYN) \
                and (not window_changed or sack_new) \
                and not (seg.sack_blocks and _unwrap(seg.sack_blocks[0][1], una) <= una):
            # Duplicate ACK (one reporting a D-SACK is the echo of a needless
            # retransmission, not a sign of loss: RFC 2883).
            self._dupacks += 1
            if self._in_recovery:
                if not self.sack_ok:
                    cc.cwnd += self.send_mss  # NewReno window inflation
            elif una >= self._recover and una > self._rto_recover and self._persist_deadline is None:
                lost = self.sack_ok and self._sacked_bytes > (_DUPTHRESH - 1) * self.send_mss
                if self._rack and self._rk_reord:
                    lost = False  # reordering seen: only RACK's time-based rule marks losses
                elif self._dupacks >= _DUPTHRESH:
                    lost = True
                if lost or (self._rack and self._rk_lost_to > una):
                    self._enter_recovery(now)
                elif self.snd_nxt == self.snd_max:
                    # Limited transmit (RFC 3042): one new segment per early duplicate ACK.
                    self._send_new(now, extra=self._dupacks * self.send_mss)
        if self._persist_deadline is not None:
            self._retries = 0  # the peer answers our probes: never give up on it
            if self.snd_wnd >= min(self.send_mss, max(self._buf_seq + len(self._sndbuf) - self.snd_una, 1)):
                # The window reopened: leave persist mode and resend from SND.UNA.
                self._persist_deadline = None
                self._persist_backoff = 0
                self.snd_nxt = self.snd_una
        return True

    def _ack_new(self, tsecr: int | None, ack: int, now: float) -> None:
        """SND.UNA advances to ``ack``: free the buffer, sample RTT, grow cwnd or
        continue recovery, restart the retransmission timer. ``tsecr``: the segment's
        echoed timestamp, None without a timestamp option."""
        una = self.snd_una
        cc = self._cc
        acked = ack - una
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        # Free acknowledged bytes from the send buffer.
        buf_seq = self._buf_seq
        free_to = min(ack, buf_seq + len(self._sndbuf))
        if free_to > buf_seq:
            del self._sndbuf[:free_to - buf_seq]
            self._buf_seq = free_to
            self._notify()  # send space grew
        self._retries = 0
        self._progress_time = now
        self._persist_backoff = 0
        # RTT sample: timestamps (RFC 7323 RTTM) or the one timed segment (Karn's rule).
        rtt = None
        if self.ts_ok and tsecr:
            floor = self._ts_floor
            if floor is None or ((tsecr - floor) & _M) < _HALF:
                rtt = ((self._ts_now(now) - tsecr) & _M) / _TS_HZ
                self._rtt_sample(rtt, True)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            rtt = now - self._rtt_time
            self._rtt_sample(rtt)
            self._rtt_seq = None
        if self._sacked:
            self._sack_trim()
        if self._rack:
            ends = self._rk_end
            if ends and ends[0] <= ack:
                i = bisect_right(ends, ack)
                del ends[:i], self._rk_start[:i], self._rk_time[:i]
            rxt = self._rk_rxt
            while rxt and rxt[0][1] <= ack:
                del rxt[0]
            th = self._tlp_high
            if th is not None and ack >= th:
                # The probe's episode is over. If the probe was a retransmission and
                # this ACK answers it (not the original: its echoed timestamp is the
                # probe's), it repaired a real loss: reduce the window once (RFC 8985 §7.4).
                self._tlp_high = None
                if self._tlp_rxt and not self._in_recovery and not (
                        self.ts_ok and tsecr is not None and ((tsecr - self._tlp_ts) & _M) >= _HALF):
                    cc.on_congestion(self.snd_max - una, now)
                    cc.cwnd = max(cc.ssthresh, self.send_mss)
        if self._in_recovery:
            if ack >= self._recover:
                self._in_recovery = False
                self._dupacks = 0
                if self._rack:
                    if self._rk_persist > 0:
                        self._rk_persist -= 1
                    else:
                        self._rk_mult = 1
                if self.sack_ok:
                    cc.cwnd = cc.ssthresh
                else:
                    cc.cwnd = min(cc.ssthresh, max(self.snd_max - ack, self.send_mss) + self.send_mss)
            elif self.sack_ok:
                self._una_rxt_time = now  # a new first hole: its retransmission went out since
            else:
                # NewReno partial ACK (RFC 6582): retransmit the next hole, deflate.
                opts = self._options(now)
                self._send_data(ack, self._seg_max(opts), now, opts, self._window_field())
                self.stats.retransmits += 1
                cw = cc.cwnd - acked
                if acked >= self.send_mss:
                    cw += self.send_mss
                cc.cwnd = max(cw, self.send_mss)
        else:
            self._dupacks = 0
            hs = cc.hystart
            if hs is not None and cc.cwnd < cc.ssthresh:
                hs.on_ack(ack, self.snd_nxt, rtt)
                if hs.exit_to_ca:
                    hs.exit_to_ca = False
                    cc.ssthresh = cc.cwnd  # HyStart++: slow start ends here, without a loss
            cc.on_ack(acked, now, self._srtt)
        # Restart the retransmission timer (RFC 6298 5.3) or stop it.
        if self.snd_max > ack:
            self._rto_deadline = now + self._rto
        else:
            self._rto_deadline = None
        if self._rack:
            self._tlp_arm(now)
        self._update_stats()

    def _process_data(self, seg: Segment, seq: int, payload: memoryview, now: float) -> None:
        rnxt = self.rcv_nxt
        plen = len(payload)
        fin = bool(seg.flags & FIN)
        # Trim to what we already have on the left and to the advertised window on the right.
        if seq < rnxt:
            cut = rnxt - seq
            if self.sack_ok and plen:
                self._dsack = (seq, seq + min(cut, plen))
            if cut > plen:
                # Only a FIN we already have (or nothing) is left: just re-ACK.
                self._ack_now = True
                return
            payload = payload[cut:]
            plen -= cut
            seq = rnxt
        right = max(self.rcv_adv, rnxt)
        if seq + plen > right:
            payload = payload[:max(right - seq, 0)]
            plen = len(payload)
            fin = False
            self._ack_now = True
        if seq == rnxt:
            filled_hole = bool(self._ooo)
            if plen:
                self._rcvbuf.append(payload)
                rnxt += plen
                self.stats.bytes_received += plen
                if self._ooo:
                    rnxt = self._drain_ooo(rnxt)
                self.rcv_nxt = rnxt
                self._notify()
                if plen > self._rcv_full and plen <= self._our_mss:
                    self._rcv_full = plen
                if filled_hole:
                    self._ack_now = True
                else:
                    if plen >= self._rcv_full:
                        self._unacked_segs += 2
                    else:
                        self._unacked_segs += 1  # small segment: ACK after the delay
                    if self._unacked_segs >= (_ACK_STRETCH if self.coalesce_acks else 4):
                        self._ack_now = True
                self._rcv_rtt_update(seg.tsecr if seg.has_ts else None, rnxt, now)
            if fin or (self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt):
                self._take_fin(now)
        else:
            # Out of order: keep it (bounded by the window) and ACK at once with SACK.
            if plen:
                self._ooo_insert(seq, payload)
            if fin:
                self._ooo_fin = seq + plen
            self._ack_now = True

    def _rcv_rtt_update(self, tsecr: int | None, rnxt: int, now: float) -> None:
        """Receiver-side RTT estimate for autotuning: from the echoed timestamp ``tsecr``
        (None: no timestamp option), or the time it takes a window's worth of data to arrive."""
        if self.ts_ok:
            # Only the first segment echoing a timestamp is a sample: later ones echoing the same
            # value only add the time they queued behind it (Linux samples the same way).
            if not tsecr or tsecr == self._rcv_rtt_tsecr:
                return
            self._rcv_rtt_tsecr = tsecr
            r = ((self._ts_now(now) - tsecr) & _M) / _TS_HZ
        else:
            mark = self._rcv_rtt_seq
            if mark is None:
                self._rcv_rtt_seq = rnxt + max(self.rcv_adv - rnxt, self._rcv_full)
                self._rcv_rtt_time = now
                return
            if rnxt < mark:
                return
            r = now - self._rcv_rtt_time
            self._rcv_rtt_seq = None
        old = self._rcv_rtt
        self._rcv_rtt = r if old is None else (r if r < old else 0.875 * old + 0.125 * r)

    def _ooo_insert(self, seq: int, payload: memoryview) -> None:
        """Keep out-of-order data as sorted, disjoint, non-touching blocks."""
        end = seq + len(payload)
        ooo = self._ooo
        self._ooo_stamp += 1
        i = 0
        n = len(ooo)
        while i < n and ooo[i][1] < seq:
            i += 1
        if i < n and ooo[i][0] <= seq:
            b = ooo[i]
            if end > b[1]:
                b[2] += payload[b[1] - seq:]  # the common case: extends a block to the right
                b[1] = end
        elif i < n and ooo[i][0] <= end:
            b = [seq, end, bytearray(payload), 0]
            ooo.insert(i, b)
        else:
            if n >= _MAX_OOO_BLOCKS:
                return  # too fragmented: drop, the sender retransmits
            ooo.insert(i, [seq, end, bytearray(payload), self._ooo_stamp])
            return
        b[3] = self._ooo_stamp
        # Absorb following blocks that now overlap or touch this one.
        while i + 1 < len(ooo) and ooo[i + 1][0] <= b[1]:
            nb = ooo.pop(i + 1)
            if nb[1] > b[1]:
                b[2] += memoryview(nb[2])[b[1] - nb[0]:]
                b[1] = nb[1]

    def _drain_ooo(self, rnxt: int) -> int:
        ooo = self._ooo
        while ooo and ooo[0][0] <= rnxt:
            s, e, data, _ = ooo.pop(0)
            if e > rnxt:
                self._rcvbuf.append(memoryview(data)[rnxt - s:])
                self.stats.bytes_received += e - rnxt
                rnxt = e
        return rnxt

    def _take_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self._fin_received = True
        self._ooo_fin = None
        self._ack_now = True
        st = self.state
        if st == TCPState.ESTABLISHED:
            self.state = TCPState.CLOSE_WAIT
        elif st == TCPState.FIN_WAIT_1:
            if self._fin_seq is not None and self.snd_una > self._fin_seq:
                self._enter_time_wait(now)
            else:
                self.state = TCPState.CLOSING
        elif st == TCPState.FIN_WAIT_2:
            self._enter_time_wait(now)
        self._notify()

    def _autotune(self, now: float) -> None:
        """Receive buffer autotuning: once per RTT, size the buffer after what the
        application consumed (about 2x that plus 16 segments), never shrinking."""
        rtt = self._rcv_rtt or self._srtt
        if rtt is None:
            rtt = 0.1
        if now - self._rcv_space_time < rtt:
            return
        copied = self._rcv_space_copied
        self._rcv_space_copied = 0
        self._rcv_space_time = now
        target = min(2 * copied + 16 * self._rcv_full, self.options.recv_buffer_max)
        if target > self.recv_buffer_size:
            self.recv_buffer_size = target  # only ever grows: the window already offered stays valid

    # --- timers ---

    def _handle_timer(self, now: float) -> None:
        d = self._state_deadline
        if d is not None and now >= d:
            self._state_deadline = None
            if self.state in (TCPState.TIME_WAIT, TCPState.FIN_WAIT_2):
                self._enter_closed(None)
                return
        if self.state == TCPState.CLOSED:
            return
        d = self._rto_deadline
        if d is not None and now >= d:
            self._on_rto(now)
            if self.state == TCPState.CLOSED:
                return
        d = self._rk_deadline
        if d is not None and now >= d:
            self._rk_deadline = None
            self._rack_detect(now)
            if self._rk_lost_to > self.snd_una:
                if self._in_recovery:
                    self._sack_output(now)
                else:
                    self._rack_enter_recovery(now)
        d = self._tlp_deadline
        if d is not None and now >= d:
            self._tlp_deadline = None
            self._on_tlp(now)
        d = self._persist_deadline
        if d is not None and now >= d:
            self._on_persist(now)
            if self.state == TCPState.CLOSED:
                return
        d = self._delack_deadline
        if d is not None and now >= d:
            self._delack_deadline = None
            if self._unacked_segs or self._ack_now:
                self._send_ack(now)
        d = self._ka_deadline
        if d is not None and now >= d:
            self._on_keepalive(now)

    def _give_up(self) -> None:
        self._enter_closed(TimeoutError(errno.ETIMEDOUT, "connection timed out"))
        self._shut_wr = True

    def _timed_out(self, now: float, limit: int) -> bool:
        ut = self.options.user_timeout
        if ut is not None and now - self._progress_time >= ut:
            return True
        return self._retries > limit

    def _on_rto(self, now: float) -> None:
        self._rto_deadline = None
        st = self.state
        if self.snd_max <= self.snd_una:
            return
        self._retries += 1
        self.stats.timeouts += 1
        handshake = st in (TCPState.SYN_SENT, TCPState.SYN_RECEIVED)
        if self._timed_out(now, self.options.syn_retries if handshake else self.options.data_retries):
            self._give_up()
            return
        self._rto = min(self._rto * 2, self.options.max_rto)
        self._rtt_seq = None  # Karn: nothing sent before now may be timed
        # With timestamps, an ACK may echo a segment sent before this timeout although
        # it acknowledges the retransmission (its ACK was lost): not a valid sample.
        self._ts_floor = self._ts_now(now)
        if handshake:
            self._send_syn(now, with_ack=st == TCPState.SYN_RECEIVED)
            self.stats.retransmits += 1
        else:
            flight = self.snd_max - self.snd_una
            cc = self._cc
            if self._retries == 1 and not self._in_recovery:
                cc.on_timeout(flight, now)
            else:
                # Backed-off timeouts, or a timeout ending a fast recovery that already
                # reduced ssthresh for this loss episode: do not reduce it again.
                cc.cwnd = self.send_mss
                if cc.hystart is not None:
                    cc.hystart.reset()
            # Go back N from SND.UNA; SACK state is discarded (the peer may renege).
            self._rack_reset()
            self._in_recovery = False
            self._dupacks = 0
            self._recover = self.snd_max
            self._rto_recover = self.snd_max
            self._sacked.clear()
            self._sacked_bytes = 0
            self.snd_nxt = self.snd_una
            self._send_new(now)
            self._rto_deadline = None
            if self.snd_nxt > self.snd_una:
                self._rto_deadline = now + self._rto
                ut = self.options.user_timeout
                if ut is not None:
                    self._rto_deadline = min(self._rto_deadline, self._progress_time + ut)
            self._update_stats()
            return
        self._rto_deadline = now + self._rto
        ut = self.options.user_timeout
        if ut is not None:
            self._rto_deadline = min(self._rto_deadline, self._progress_time + ut)
        self._update_stats()

    def _on_persist(self, now: float) -> None:
        self._persist_deadline = None
        data_end = self._buf_seq + len(self._sndbuf)
        una = self.snd_una
        if una >= data_end:
            return
        if self.snd_wnd >= min(self.send_mss, data_end - una):
            self.snd_nxt = una
            self._output(now)
            return
        self._persist_backoff += 1
        self._retries += 1
        if self._timed_out(now, self.options.data_retries):
            self._give_up()
            return
        # Probe from SND.UNA: with a small open window, fill it (the sender SWS override);
        # with a closed one, one byte beyond it. The ACK carries the current window.
        opts = self._options(now)
        n = max(1, min(self.snd_wnd, self._seg_max(opts)))
        used = self._send_data(una, n, now, opts, self._window_field())
        if una + used > self.snd_max:
            self.snd_max = una + used
        if self.snd_nxt < una + used:
            self.snd_nxt = una + used
        self._rto_deadline = None
        delay = self._clamped_rto(self._rto) * (1 << min(self._persist_backoff, 10))
        self._persist_deadline = now + min(delay, _PERSIST_MAX)

    def _on_keepalive(self, now: float) -> None:
        opts = self.options
        idle = opts.keepalive_idle
        if idle is None or self.state not in (TCPState.ESTABLISHED, TCPState.CLOSE_WAIT,
                                                TCPState.FIN_WAIT_2):
            self._ka_deadline = None
            return
        if self.snd_max > self.snd_una or self._persist_deadline is not None:
            self._ka_deadline = now + idle  # data in flight: the RTO watches the peer
            return
        since = now - self._last_rcv_time
        if since < idle:
            self._ka_probes = 0
            self._ka_deadline = self._last_rcv_time + idle
            return
        if self._ka_probes >= opts.keepalive_count:
            self._give_up()
            return
        self._ka_probes += 1
        # Probe: an ACK one byte to the left of SND.UNA (already acknowledged), which the peer must answer.
        self._emit(self.snd_una - 1, ACK, self._options(now), None, self._window_field())
        self._ka_deadline = now + opts.keepalive_interval
