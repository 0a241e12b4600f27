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
from dataclasses import dataclass

from .tcp_wire import Segment

__all__ = ["TCPConnection", "TCPOptions", "TCPState", "TCPStats"]


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
    srtt: float | None = None
    rto: float = 1.0
    cwnd: int = 0
    ssthresh: int = 0


class TCPConnection:
    """One connection. See the module docstring for the contract with the stack."""

    # --- construction -----------------------------------------------------------

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
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """Earliest pending deadline, or None."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        """Fire every timer whose deadline is <= now."""
        raise NotImplementedError

    # --- the application side -------------------------------------------------

    @property
    def readable(self) -> int:
        """Bytes waiting in the receive buffer."""
        raise NotImplementedError

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read."""
        raise NotImplementedError

    @property
    def send_space(self) -> int:
        """How many bytes :meth:`send` would accept now (0 while the buffer is full)."""
        raise NotImplementedError

    @property
    def is_established(self) -> bool:
        """The handshake completed (true from ESTABLISHED onwards, also while closing)."""
        raise NotImplementedError

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue up to ``send_space`` bytes for sending; returns how many were taken.

        Raises BrokenPipeError after :meth:`shutdown`/:meth:`close`, and ``self.error``
        if the connection failed.
        """
        raise NotImplementedError

    def receive(self, max_bytes: int, now: float) -> bytes:
        """Take up to ``max_bytes`` from the receive buffer (b"" if none yet; check ``at_eof``).

        Freeing buffer space may queue a window update.
        """
        raise NotImplementedError

    def shutdown(self, now: float) -> None:
        """Half-close: send FIN after everything already queued. Idempotent."""
        raise NotImplementedError

    def close(self, now: float) -> None:
        """Full close: like :meth:`shutdown`, but unread received data (or data that
        arrives later) makes it reset the connection (RFC 9293 §3.6 / RFC 2525)."""
        raise NotImplementedError

    def abort(self, now: float) -> None:
        """Send RST (if synchronized) and go to CLOSED at once."""
        raise NotImplementedError
