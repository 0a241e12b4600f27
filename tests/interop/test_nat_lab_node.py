"""NAT-lab scenarios that need a whole node or a real tailscaled (tests/lab/nat_topology.py).

Complements tests/interop/test_magicsock_nat.py (raw-ICMP Python nodes):

* our full node and tailscaled 1.96.4, both behind easy NATs: hole punching, TCP direct.
* tailscaled 1.96.4 as the peer relay for our two Python nodes behind hard NATs.
* our full node (``tsnet up --relay-server-port``) as the peer relay for two
  tailscaled behind hard NATs; its ``tailscaled_peer_relay_endpoints`` gauge.
* relay failover: SIGKILL the relay under an open TCP stream between two full
  nodes; the path falls back to DERP within 5 s, the stream survives intact,
  and after a restart the path moves back to the relay.
* a relay grant naming other (tagged) nodes only: they use the relay, the
  ungranted pair stays on DERP and never asks it for an endpoint.
* a hand-written ``cap/relay-target`` grant makes untagged nodes ask a relay
  whose own grant names tagged nodes only: the relay refuses every request
  (``relay_allocate_not_granted``), allocates no endpoint, and they stay on DERP;
  tailscaled 1.96.4 as such an ungranted client is refused the same way.
* 3 % random loss on a NAT link: a multi-MiB TCP transfer stays intact.

TCP streams go from the test (a socket created inside node a's namespace)
through a's SOCKS5 proxy, across the tailnet, to b's ``--forward`` port and a
server the test runs inside b's namespace.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Lab, Namespace
from tests.lab.nat_topology import RELAY_POLICY, FullNode, NatTopology, TailscaledNode, start_tailscaled_node

pytestmark = pytest.mark.interop

TIMEOUT = 30.0
RELAY_PORT = 40000
SOCKS_PORT = 1080
FWD_PORT = 8000  # tailnet port on b
SERVICE_PORT = 9000  # b's namespace-local server behind the forward


def _wait(cond: Callable[[], object], what: str, topo: NatTopology, timeout: float = TIMEOUT,
          allow_dead: tuple[object, ...] = ()) -> None:
    """Poll ``cond`` (bounded); fail at once if an unexpected lab process died, printing the logs."""
    topo.wait(cond, what, timeout, allow_dead=allow_dead)


# -- TCP helpers (blocking sockets inside lab namespaces) ---------------------------------------------------


def _socks5_connect(ns: Namespace, socks_port: int, host: str, port: int, timeout: float = 20.0) -> socket.socket:
    """A TCP stream to ``host:port`` through the SOCKS5 proxy on ``ns``'s 127.0.0.1 (no auth, IPv4 CONNECT)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", socks_port))
    sock.sendall(b"\x05\x01\x00")
    assert _recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    reply = _recv_exact(sock, 10)
    assert reply[:2] == b"\x05\x00", f"SOCKS5 CONNECT refused: {reply!r}"
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _serve(ns: Namespace, handler: Callable[[socket.socket], None]) -> socket.socket:
    """A TCP listener on ``ns``'s 127.0.0.1:SERVICE_PORT; each connection runs ``handler`` in a thread."""
    lsock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", SERVICE_PORT))
    lsock.listen(8)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # closed at teardown
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return lsock


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _sha256_sink(conn: socket.socket) -> None:
    """Read an 8-byte length and that many bytes; answer their SHA-256 (hex)."""
    with conn:
        conn.settimeout(120)
        n = struct.unpack("!Q", _recv_exact(conn, 8))[0]
        h = hashlib.sha256()
        left = n
        while left:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                return
            h.update(chunk)
            left -= len(chunk)
        conn.sendall(h.hexdigest().encode())


def _sha256_roundtrip(a: FullNode, b_ip: str, data: bytes) -> bool:
    with _socks5_connect(a.host.ns, SOCKS_PORT, b_ip, FWD_PORT) as sock:
        sock.sendall(struct.pack("!Q", len(data)) + data)
        assert _recv_exact(sock, 64).decode() == hashlib.sha256(data).hexdigest()
    return True


def _pattern(offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset+n`` of an endless, position-dependent stream (so reordering/loss would show)."""
    start = offset // 8
    words = b"".join(struct.pack("!Q", (i * 0x9E3779B97F4A7C15) & (2**64 - 1)) for i in range(start, start + n // 8 + 2))
    skip = offset - start * 8
    return words[skip:skip + n]


class EchoStream:
    """Keeps sending a known byte stream to an echo server and checks every byte that comes back."""

    def __init__(self, sock: socket.socket, chunk: int = 8192, rate: float = 256 * 1024) -> None:
        self.sock = sock
        self.chunk = chunk
        self.pause = chunk / rate  # pacing, so the stream stays open for the whole scenario without flooding
        self.sent = 0
        self.received = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        try:
            while not self._stop.is_set():
                self.sock.sendall(_pattern(self.sent, self.chunk))
                self.sent += self.chunk
                self._stop.wait(self.pause)
        except BaseException as exc:
            self.error = self.error or exc

    def _recv(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("echo stream closed by the far end")
                want = _pattern(self.received, len(data))
                if data != want:
                    raise AssertionError(f"echoed bytes differ at offset {self.received}")
                self.received += len(data)
        except BaseException as exc:
            if not (self._stop.is_set() and self.received == self.sent):
                self.error = self.error or exc

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"TCP stream broke after {self.sent} sent / {self.received} echoed: "
                                 f"{self.error!r}") from self.error

    def stop_sending(self) -> None:
        self._stop.set()
        self._threads[0].join(10)


def _full_pair(topo: NatTopology, kind_a: str, kind_b: str) -> tuple[FullNode, FullNode]:
    """Full nodes a (SOCKS5 proxy) and b (tailnet port FWD_PORT -> b's 127.0.0.1:SERVICE_PORT)."""
    ha, hb = topo.add_host("a", kind_a), topo.add_host("b", kind_b)
    b = topo.start_full_node(hb, forwards=(f"{FWD_PORT}=127.0.0.1:{SERVICE_PORT}",))
    a = topo.start_full_node(ha, socks5_port=SOCKS_PORT)
    for n in (a, b):
        _wait(n.running, f"{n.host.name} running", topo)
    _wait(lambda: a.peer("b") is not None and b.peer("a") is not None, "a and b see each other", topo)
    return a, b


# -- tailscaled behind an easy NAT <-> our full node behind an easy NAT ----------------------------------


def test_full_node_and_tailscaled_behind_easy_nats_go_direct(lab: Lab, tmp_path: Path, tailscale_binaries) -> None:
    """Hole punching between our ``tsnet up`` node and tailscaled 1.96.4, then TCP over the direct path."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control()
    ht, hp = topo.add_host("ts", "easy"), topo.add_host("py", "easy")
    ts = start_tailscaled_node(topo, ht, tailscale_binaries)
    py = topo.start_full_node(hp, socks5_port=SOCKS_PORT)
    _wait(py.running, "py running", topo)
    _wait(lambda: ts.peer("py") is not None and py.peer("ts") is not None, "both see each other", topo)
    # tailscaled (userspace networking) hands tailnet TCP to its namespace's loopback: an echo server there.
    _serve(ht.ns, _echo)
    ts_ip = ts.ipv4()
    with _socks5_connect(hp.ns, SOCKS_PORT, ts_ip, SERVICE_PORT) as sock:
        sock.sendall(b"over DERP first")
        assert _recv_exact(sock, 15) == b"over DERP first"
    out = ts.cli("ping", "--c", "20", "--timeout", "3s", py.ipv4(), timeout=90)
    assert f"via {hp.public_ip}:41641" in out, out
    _wait(lambda: py.path("ts") == f"direct {ht.public_ip}:41641", "our node direct to tailscaled", topo)
    _wait(lambda: (ts.peer("py") or {}).get("CurAddr") == f"{hp.public_ip}:41641", "tailscaled direct to us", topo)
    derp_sent = py.metric("tsnet_magicsock_core_wg_sent_derp")
    assert derp_sent > 0  # the first connection went over DERP
    stream = EchoStream(_socks5_connect(hp.ns, SOCKS_PORT, ts_ip, SERVICE_PORT), rate=1024 * 1024)
    _wait(lambda: stream.check() or stream.received > 512 * 1024, "512 KiB echoed over the direct path", topo)
    stream.stop_sending()
    _wait(lambda: stream.check() or stream.received == stream.sent, "every byte echoed", topo)
    stream.check()
    assert py.path("ts").startswith("direct"), py.path("ts")
    assert (ts.peer("py") or {}).get("CurAddr") == f"{hp.public_ip}:41641"
    assert py.metric("tsnet_magicsock_core_wg_sent_derp") == derp_sent  # no WireGuard via DERP once direct


# -- tailscaled as the peer relay ------------------------------------------------------------------------


def test_our_nodes_behind_hard_nats_use_tailscaled_peer_relay(lab: Lab, tmp_path: Path, tailscale_binaries) -> None:
    """tailscaled 1.96.4 on the internet with ``tailscale set --relay-server-port``; our hard<->hard pair uses it."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=RELAY_POLICY)
    hr = topo.add_host("tsrelay", "public")
    relay = start_tailscaled_node(topo, hr, tailscale_binaries)
    relay.cli("set", f"--relay-server-port={RELAY_PORT}")
    ha, hb = topo.add_host("a", "hard"), topo.add_host("b", "hard")
    b = topo.start_python_node(hb)
    a = topo.start_python_node(ha, ping="b")
    _wait(lambda: a.peer("tsrelay") is not None and b.peer("tsrelay") is not None, "both see the relay", topo)
    _wait(lambda: a.status().get("replies", 0) > 0, "echo replies", topo)
    want = f"{hr.public_ip}:{RELAY_PORT}:vni:"
    _wait(lambda: a.path_kind("b") == "peer-relay" and b.path_kind("a") == "peer-relay", "relay path both ways",
          topo)
    assert a.peer("b")["addr"].startswith(want) and b.peer("a")["addr"].startswith(want)
    derp_sent = a.status()["counters"].get("wg_sent_derp", 0)
    n = a.status()["replies"]
    _wait(lambda: a.status()["replies"] > n + 10, "replies over tailscaled's relay", topo)
    assert a.status()["counters"].get("wg_sent_derp", 0) == derp_sent
    assert a.path_kind("b") == "peer-relay"


# -- our full node as the peer relay for two tailscaled --------------------------------------------------


def test_two_tailscaled_behind_hard_nats_use_our_full_node_relay(lab: Lab, tmp_path: Path,
                                                                  tailscale_binaries) -> None:
    """``tsnet up --relay-server-port`` relays for two tailscaled; its endpoint gauge counts the bound session."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=RELAY_POLICY)
    hr = topo.add_host("relay", "public")
    relay = topo.start_full_node(hr, relay_server_port=RELAY_PORT)
    _wait(relay.running, "relay running", topo)
    h1, h2 = topo.add_host("ts1", "hard"), topo.add_host("ts2", "hard")
    ts1 = start_tailscaled_node(topo, h1, tailscale_binaries)
    ts2 = start_tailscaled_node(topo, h2, tailscale_binaries, port=41642)
    _wait(lambda: ts1.peer("relay") is not None and ts2.peer("relay") is not None and ts1.peer("ts2") is not None,
          "everyone sees everyone", topo)
    ip2 = ts2.ipv4()
    want = f"via peer-relay({hr.public_ip}:{RELAY_PORT}:vni:"

    def pinged_via_relay() -> bool:
        out = ts1.cli("ping", "--until-direct=false", "--c", "3", "--timeout", "2s", ip2, timeout=30, check=False)
        return want in out

    _wait(pinged_via_relay, "tailscale ping goes via our peer relay", topo, timeout=60)
    _wait(lambda: (ts1.peer("ts2") or {}).get("PeerRelay", "").startswith(f"{hr.public_ip}:{RELAY_PORT}"),
          "tailscaled status shows the peer relay", topo)
    _wait(lambda: relay.metric("tailscaled_peer_relay_endpoints") > 0, "relay endpoint gauge > 0", topo)
    assert 'tailscaled_peer_relay_endpoints{state="open"} 1' in relay.metrics()
    assert relay.metric("tailscaled_peer_relay_forwarded_packets_total") > 0
    # The relay also shows the two clients it serves in its own peer list.
    assert relay.peer("ts1") is not None and relay.peer("ts2") is not None


# -- relay failover under an open TCP stream -------------------------------------------------------------


def test_relay_killed_under_tcp_stream_falls_back_to_derp_and_returns(lab: Lab, tmp_path: Path) -> None:
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=RELAY_POLICY)
    hr = topo.add_host("relay", "public")
    relay = topo.start_full_node(hr, relay_server_port=RELAY_PORT)
    _wait(relay.running, "relay running", topo)
    a, b = _full_pair(topo, "hard", "hard")
    _serve(b.host.ns, _echo)
    b_ip = b.ipv4()
    _wait(lambda: a.peer("relay") and b.peer("relay"), "both see the relay", topo)
    # Traffic makes the nodes look for a better path than DERP: the relay.
    stream = EchoStream(_socks5_connect(a.host.ns, SOCKS_PORT, b_ip, FWD_PORT))
    _wait(lambda: a.path(b.host.name) == "relay via relay" and b.path("a") == "relay via relay",
          "relay path both ways", topo)
    mark = stream.received
    _wait(lambda: stream.check() or stream.received > mark + 256 * 1024, "stream flows over the relay", topo)

    relay.kill()
    killed_at = time.monotonic()
    dead = (relay.proc,)
    # Control sees the relay's map poll end and says so; both ends drop the relay path right away.
    _wait(lambda: a.path("b").startswith("derp") and b.path("a").startswith("derp"),
          "both fall back to DERP within 5 s", topo, timeout=5.0, allow_dead=dead)
    fallback = time.monotonic() - killed_at
    mark = stream.received
    _wait(lambda: stream.check() or stream.received > mark, "stream resumes over DERP", topo, allow_dead=dead)
    resumed = time.monotonic() - killed_at
    mark = stream.received
    _wait(lambda: stream.check() or stream.received > mark + 256 * 1024, "stream flows over DERP", topo,
          allow_dead=dead)

    relay.start()
    restarted_at = time.monotonic()
    _wait(lambda: a.path("b") == "relay via relay" and b.path("a") == "relay via relay",
          "back on the relay after its restart", topo, timeout=45, allow_dead=dead)
    back = time.monotonic() - restarted_at
    mark = stream.received
    _wait(lambda: stream.check() or stream.received > mark + 256 * 1024, "stream flows over the relay again", topo,
          allow_dead=dead)

    stream.stop_sending()
    _wait(lambda: stream.check() or stream.received == stream.sent, "every byte echoed", topo, allow_dead=dead)
    stream.check()
    print(f"relay killed: DERP path after {fallback:.2f} s, stream moving again after {resumed:.2f} s; "
          f"back on the relay {back:.2f} s after its restart; "
          f"{stream.sent} bytes echoed intact")
    assert stream.sent > 768 * 1024


# -- a relay grant that names other nodes only --------------------------------------------------------

# Only tagged nodes may use the relay; a and b join untagged.
NARROW_RELAY_POLICY = """{
  "tagOwners": {"tag:relay": ["autogroup:member"], "tag:client": ["autogroup:member"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "grants": [{"src": ["tag:client"], "dst": ["tag:relay"], "app": {"tailscale.com/cap/relay": []}}],
}
"""


def _tagged_relay_and_clients(topo: NatTopology) -> tuple[Any, tuple[Any, Any], tuple[Any, Any]]:
    """A public relay node tagged tag:relay, and c1 (SOCKS5) and c2 (forward to the service) tagged
    tag:client, each behind a hard NAT: ``(relay, (host c1, c1), (host c2, c2))``."""
    hr = topo.add_host("relay", "public")
    relay = topo.start_full_node(hr, relay_server_port=RELAY_PORT, advertise_tags=("tag:relay",))
    h1, h2 = topo.add_host("c1", "hard"), topo.add_host("c2", "hard")
    c2 = topo.start_full_node(h2, forwards=(f"{FWD_PORT}=127.0.0.1:{SERVICE_PORT}",), advertise_tags=("tag:client",))
    c1 = topo.start_full_node(h1, socks5_port=SOCKS_PORT, advertise_tags=("tag:client",))
    return relay, (h1, c1), (h2, c2)


def test_relay_granted_to_other_nodes_only_is_not_used_by_ungranted_nodes(lab: Lab, tmp_path: Path) -> None:
    """The grant names tag:client nodes only: c1<->c2 use the relay, untagged a<->b stay on DERP."""
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=NARROW_RELAY_POLICY)
    relay, (h1, c1), (h2, c2) = _tagged_relay_and_clients(topo)
    ha, hb = topo.add_host("a", "hard"), topo.add_host("b", "hard")
    b = topo.start_python_node(hb)
    a = topo.start_python_node(ha, ping="b")
    for n in (relay, c1, c2):
        _wait(n.running, f"{n.host.name} running", topo)
    _wait(lambda: all(n.peer("relay") for n in (a, b, c1, c2)) and c1.peer("c2") and a.peer("b"),
          "everyone sees the relay and their partner", topo)
    assert c1.peer("relay")["tags"] == ["tag:relay"] and c1.peer("c2")["tags"] == ["tag:client"]
    # Granted pair: onto the relay.
    _serve(h2.ns, _echo)
    stream = EchoStream(_socks5_connect(h1.ns, SOCKS_PORT, c2.ipv4(), FWD_PORT))
    _wait(lambda: stream.check() or (c1.path("c2") == "relay via relay" and c2.path("c1") == "relay via relay"),
          "granted pair on the relay", topo)
    # Ungranted pair: traffic flows over DERP; they never even ask the relay for an endpoint.
    _wait(lambda: a.status().get("replies", 0) > 0, "a<->b echo replies", topo)
    n = a.status()["replies"]
    _wait(lambda: a.status()["replies"] > n + 30, "a<->b keep talking", topo)  # ~6 s: past relay discovery
    assert a.path_kind("b") == "derp" and b.path_kind("a") == "derp"
    for n in (a, b):
        assert n.status()["relay"].get("allocate_sent", 0) == 0, n.status()["relay"]
    gauge = relay.metric("tailscaled_peer_relay_endpoints")
    assert gauge == 1, relay.metrics()  # only c1<->c2's endpoint
    stream.stop_sending()
    _wait(lambda: stream.check() or stream.received == stream.sent, "every byte echoed", topo)
    stream.check()


# -- the relay itself refuses nodes it does not grant ---------------------------------------------------

# The relay serves tag:client only (cap/relay in its filter names c1 and c2), yet a hand-written app grant
# tells every untagged member that the relay is theirs (cap/relay-target from the relay in a's and b's filters).
SPOOFED_RELAY_TARGET_POLICY = """{
  "tagOwners": {"tag:relay": ["autogroup:member"], "tag:client": ["autogroup:member"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "grants": [
    {"src": ["tag:client"], "dst": ["tag:relay"], "app": {"tailscale.com/cap/relay": []}},
    {"src": ["tag:relay"], "dst": ["autogroup:member"], "app": {"tailscale.com/cap/relay-target": []}},
  ],
}
"""

ALLOC_SENT = "tsnet_magicsock_core_disco_sent_allocateudprelayendpointrequest"
ALLOC_RECV = "tsnet_magicsock_core_disco_recv_allocateudprelayendpointrequest"
ALLOC_ANSWER_RECV = "tsnet_magicsock_core_disco_recv_allocateudprelayendpointresponse"
CMMVIA_RECV = "tsnet_magicsock_core_disco_recv_callmemaybevia"
RELAY_ANSWERED = "tsnet_magicsock_core_relay_allocate_answered"
RELAY_NOT_GRANTED = "tsnet_magicsock_core_relay_allocate_not_granted"
RELAY_REFUSED = "tsnet_magicsock_core_relay_allocate_refused"
RELAY_NO_SERVER = "tsnet_magicsock_core_relay_allocate_no_server"
RELAY_ENDPOINTS = "tailscaled_peer_relay_endpoints"


def test_relay_refuses_allocations_from_nodes_its_own_grant_does_not_name(lab: Lab, tmp_path: Path) -> None:
    """Issue #6 scenario 6 end to end: the relay's own ``cap/relay`` check refuses ungranted nodes.

    Why a hand-written ``cap/relay-target`` grant: the client side only asks relays its filter names, so
    with an honest policy an ungranted node never reaches the relay's check (see
    ``test_relay_granted_to_other_nodes_only_is_not_used_by_ungranted_nodes``). The relay must not trust
    that: a client with a stale or forged view (an old netmap after a policy edit, a modified client, a
    policy that writes the target cap by hand) will ask anyway. A policy reload that revokes a grant only
    opens a race window of one netmap push (both ends get the new filter within milliseconds), which is
    not a deterministic test. The hand-written app grant is what the policy language really allows and
    gives a lasting mismatch: a and b hold ``cap/relay-target`` from the relay while the relay's filter
    grants ``cap/relay`` to tag:client only. All five nodes are real ``tsnet up`` processes behind hard
    NATs (no direct path), so the relay is the only way off DERP.
    """
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=SPOOFED_RELAY_TARGET_POLICY)
    relay, (h1, c1), (h2, c2) = _tagged_relay_and_clients(topo)
    a, b = _full_pair(topo, "hard", "hard")
    for n in (relay, c1, c2):
        _wait(n.running, f"{n.host.name} running", topo)
    _wait(lambda: all(n.peer("relay") for n in (a, b, c1, c2)) and c1.peer("c2") and c2.peer("c1"),
          "everyone sees the relay and their partner", topo)
    assert a.peer("relay")["tags"] == ["tag:relay"] and a.peer("b")["tags"] == []

    # Both pairs talk over DERP first; that makes each node look for a relay path.
    _serve(h2.ns, _echo)
    _serve(b.host.ns, _echo)
    granted = EchoStream(_socks5_connect(h1.ns, SOCKS_PORT, c2.ipv4(), FWD_PORT))
    ungranted = EchoStream(_socks5_connect(a.host.ns, SOCKS_PORT, b.ipv4(), FWD_PORT))
    _wait(lambda: granted.check() or (c1.path("c2") == "relay via relay" and c2.path("c1") == "relay via relay"),
          "granted pair on the relay", topo)

    # The ungranted nodes do ask: a first request and its retry 3 s later (no answer came), from each side.
    _wait(lambda: ungranted.check() or (a.metric(ALLOC_SENT) >= 2 and b.metric(ALLOC_SENT) >= 2),
          "a and b each sent an allocation request and its retry to the relay", topo)
    # The relay client's own counters (exported by the node) see the same requests.
    assert a.metric("tsnet_relay_client_allocate_sent") >= 1 and b.metric("tsnet_relay_client_allocate_sent") >= 1
    assert a.metric("tsnet_relay_client_servers") == 1  # the relay: its hand-written cap/relay-target

    def refusals_add_up() -> bool:
        # Every request the relay received was answered (the granted pair) or refused as not granted, and
        # the refusals are exactly the requests a and b sent. Counters settle between discovery rounds.
        sent_ab = a.metric(ALLOC_SENT) + b.metric(ALLOC_SENT)
        r = relay.metric_values(ALLOC_RECV, RELAY_ANSWERED, RELAY_NOT_GRANTED, RELAY_REFUSED, RELAY_NO_SERVER)
        sent_ab_after = a.metric(ALLOC_SENT) + b.metric(ALLOC_SENT)
        return (sent_ab == sent_ab_after and r[RELAY_NOT_GRANTED] == sent_ab and r[RELAY_NO_SERVER] == 0
                and r[ALLOC_RECV] == r[RELAY_ANSWERED] + r[RELAY_NOT_GRANTED] + r[RELAY_REFUSED]
                and r[RELAY_ANSWERED] >= 1)

    _wait(refusals_add_up, "the relay refused every request from a and b, and only those", topo)
    r = relay.metric_values(ALLOC_RECV, RELAY_ANSWERED, RELAY_NOT_GRANTED)
    # No endpoint for a<->b: the gauge counts the granted pair's one endpoint only.
    assert relay.metric(RELAY_ENDPOINTS) == 1, relay.metrics()
    assert 'tailscaled_peer_relay_endpoints{state="open"} 1' in relay.metrics()
    # a and b never got an answer or a CallMeMaybeVia, and stay on DERP.
    for n, partner in ((a, "b"), (b, "a")):
        v = n.metric_values(ALLOC_ANSWER_RECV, CMMVIA_RECV)
        assert v == {ALLOC_ANSWER_RECV: 0.0, CMMVIA_RECV: 0.0}, v
        assert n.path(partner).startswith("derp"), n.path(partner)

    # Their traffic still flows (over DERP), intact, while the granted pair keeps its relay.
    mark = ungranted.received
    _wait(lambda: ungranted.check() or ungranted.received > mark + 256 * 1024, "a<->b stream flows over DERP",
          topo)
    assert a.path("b").startswith("derp") and b.path("a").startswith("derp")
    assert c1.path("c2") == "relay via relay" and c2.path("c1") == "relay via relay"
    assert relay.metric(RELAY_ENDPOINTS) == 1
    for stream in (granted, ungranted):
        stream.stop_sending()
    for stream, what in ((granted, "c1<->c2"), (ungranted, "a<->b")):
        _wait(lambda: stream.check() or stream.received == stream.sent, f"every {what} byte echoed", topo)
        stream.check()
    print(f"relay: {r[ALLOC_RECV]:.0f} allocation requests, {r[RELAY_ANSWERED]:.0f} answered (c1/c2), "
          f"{r[RELAY_NOT_GRANTED]:.0f} refused as not granted (a/b); a<->b echoed {ungranted.received} bytes "
          f"over DERP, c1<->c2 {granted.received} over the relay")


TS_ALLOC_SENT = "magicsock_disco_sent_alloc_udp_relay_endpoint_request"
TS_ALLOC_ANSWER_RECV = "magicsock_disco_recv_alloc_udp_relay_endpoint_response"
TS_CMMVIA_RECV = "magicsock_disco_recv_callmemaybevia"
TS_BIND_SENT = "magicsock_disco_sent_bind_udp_relay_endpoint"


def _tailscaled_client_metrics(ts: TailscaledNode, *names: str) -> dict[str, int]:
    """Some of tailscaled's client metrics from one ``tailscale debug metrics`` (0 when not listed)."""
    values = dict.fromkeys(names, 0)
    for line in ts.cli("debug", "metrics").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in values:
            values[parts[0]] = int(float(parts[1]))
    return values


def test_tailscaled_as_ungranted_client_is_refused_by_our_relay(lab: Lab, tmp_path: Path,
                                                                 tailscale_binaries) -> None:
    """tailscaled 1.96.4 holds the hand-written ``cap/relay-target`` from our relay and asks it; our relay refuses.

    Same policy as the full-node scenario above: the relay grants ``cap/relay`` to tag:client only, the
    untagged tailscaled and our untagged full node ``a`` (both behind hard NATs) believe it serves them.
    """
    topo = NatTopology(lab, tmp_path)
    topo.start_control(policy=SPOOFED_RELAY_TARGET_POLICY)
    hr = topo.add_host("relay", "public")
    relay = topo.start_full_node(hr, relay_server_port=RELAY_PORT, advertise_tags=("tag:relay",))
    ht, ha = topo.add_host("ts", "hard"), topo.add_host("a", "hard")
    a = topo.start_full_node(ha, socks5_port=SOCKS_PORT)
    ts = start_tailscaled_node(topo, ht, tailscale_binaries)
    for n in (relay, a):
        _wait(n.running, f"{n.host.name} running", topo)
    _wait(lambda: ts.peer("relay") is not None and ts.peer("a") is not None and a.peer("ts") is not None,
          "tailscaled sees the relay and a", topo)
    # tailscaled (userspace networking) hands tailnet TCP to its namespace's loopback: an echo server there.
    _serve(ht.ns, _echo)
    stream = EchoStream(_socks5_connect(ha.ns, SOCKS_PORT, ts.ipv4(), SERVICE_PORT))

    def ts_metrics() -> dict[str, int]:
        return _tailscaled_client_metrics(ts, TS_ALLOC_SENT, TS_ALLOC_ANSWER_RECV, TS_CMMVIA_RECV, TS_BIND_SENT)

    # WireGuard traffic over DERP makes both ends look for a relay path: each asks our relay.
    _wait(lambda: stream.check() or (ts_metrics()[TS_ALLOC_SENT] >= 1 and a.metric(ALLOC_SENT) >= 1),
          "tailscaled and a each sent an allocation request to our relay", topo)

    def refusals_add_up() -> bool:
        before = ts_metrics()[TS_ALLOC_SENT] + a.metric(ALLOC_SENT)
        r = relay.metric_values(ALLOC_RECV, RELAY_ANSWERED, RELAY_NOT_GRANTED, RELAY_REFUSED, RELAY_NO_SERVER)
        after = ts_metrics()[TS_ALLOC_SENT] + a.metric(ALLOC_SENT)
        return (before == after and r[RELAY_NOT_GRANTED] == before and r[ALLOC_RECV] == before
                and r[RELAY_ANSWERED] + r[RELAY_REFUSED] + r[RELAY_NO_SERVER] == 0)

    _wait(refusals_add_up, "the relay refused every request from tailscaled and a", topo)
    refused = relay.metric(RELAY_NOT_GRANTED)
    assert relay.metric(RELAY_ENDPOINTS) == 0, relay.metrics()
    v = ts_metrics()
    assert v[TS_ALLOC_ANSWER_RECV] == 0 and v[TS_CMMVIA_RECV] == 0 and v[TS_BIND_SENT] == 0, v
    assert a.metric_values(ALLOC_ANSWER_RECV, CMMVIA_RECV) == {ALLOC_ANSWER_RECV: 0.0, CMMVIA_RECV: 0.0}
    # Both stay on DERP, and traffic still flows.
    assert not (ts.peer("a") or {}).get("PeerRelay") and not (ts.peer("a") or {}).get("CurAddr"), ts.peer("a")
    assert a.path("ts").startswith("derp"), a.path("ts")
    out = ts.cli("ping", "--until-direct=false", "--c", "1", "--timeout", "5s", a.ipv4(), timeout=30)
    assert "via DERP(" in out, out
    mark = stream.received
    _wait(lambda: stream.check() or stream.received > mark + 256 * 1024, "a<->tailscaled stream flows over DERP",
          topo)
    stream.stop_sending()
    _wait(lambda: stream.check() or stream.received == stream.sent, "every byte echoed", topo)
    stream.check()
    assert a.path("ts").startswith("derp") and not (ts.peer("a") or {}).get("PeerRelay")
    assert relay.metric(RELAY_ENDPOINTS) == 0
    print(f"relay refused {refused:.0f} allocation requests (tailscaled and a); {stream.received} bytes echoed "
          f"over DERP")


# -- loss on a NAT link ----------------------------------------------------------------------------------


def test_multi_mib_transfer_survives_3_percent_loss_on_a_nat_link(lab: Lab, tmp_path: Path) -> None:
    topo = NatTopology(lab, tmp_path)
    topo.start_control()
    a, b = _full_pair(topo, "easy", "easy")
    _serve(b.host.ns, _sha256_sink)
    b_ip = b.ipv4()
    # A first small transfer makes the nodes talk (over DERP), hole punching then takes them direct.
    _wait(lambda: _sha256_roundtrip(a, b_ip, b"hello") and a.path("b").startswith("direct")
          and b.path("a").startswith("direct"), "direct path both ways", topo)
    # 3 % of the UDP (WireGuard, disco, DERP) packets a's router forwards, both directions, are dropped.
    a.host.lossy_nat_link(0.03)
    for n in (a, b):  # one datagram per wire packet, so the loss hits single datagrams
        n.host.segment_udp_in_software()
    size = 4 * 1024 * 1024
    payload = _pattern(0, size)
    started = time.monotonic()
    sock = _socks5_connect(a.host.ns, SOCKS_PORT, b_ip, FWD_PORT, timeout=120)
    with sock:
        sock.sendall(struct.pack("!Q", size))
        view = memoryview(payload)
        for off in range(0, size, 256 * 1024):
            sock.sendall(view[off:off + 256 * 1024])
        digest = _recv_exact(sock, 64).decode()
    elapsed = time.monotonic() - started
    assert digest == hashlib.sha256(payload).hexdigest()
    print(f"{size >> 20} MiB through 3 % loss in {elapsed:.1f} s ({size / elapsed / 1e6:.2f} MB/s), "
          f"path {a.path('b')!r}")
    assert a.path("b").startswith("direct"), a.path("b")
    drops = a.host.nat_link_drops()
    print(f"{drops} packets dropped on the NAT link")
    assert drops > 50
