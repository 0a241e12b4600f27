"""Our WireGuard core + trio driver against Debian's wireguard-go (a real kernel IP stack behind a TUN).

The Python peer sits in its own namespace (socket created there via setns);
wireguard-go runs in another, with MTU 1280 and the overlay .1/24. Packets we
send are built by tests.lab.packets; replies come from the Linux kernel, so a
correct reply proves that both our encryption and our decryption work.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.lab.packets import PROTO_ICMP, icmp_echo, parse_icmp_echo, parse_ipv4
from tsnet.wg import HandshakeCompleted, HandshakeFailed, Limits, PacketReceived, PeerEndpointChanged, WireGuard
from tsnet.wg.driver import WireGuardUDP

if TYPE_CHECKING:
    from tests.interop.conftest import WireGuardGoSetup

pytestmark = pytest.mark.interop

STEP_TIMEOUT = 10.0  # bound for any single wait; tests finish in a few seconds when healthy


class PythonPeer:
    """Our device + driver, with the events it reported, in arrival order."""

    def __init__(
        self, setup: WireGuardGoSetup, limits: Limits | None = None, port: int = 0, wrap: Callable[[WireGuard], Any] | None = None
    ) -> None:
        self.setup = setup
        self.device = WireGuard(setup.our_private, now=trio.current_time(), limits=limits)
        self.device.add_peer(setup.wg_public, endpoint=setup.wg_endpoint)
        self.events: list[Any] = []
        self._changed = trio.Event()
        driven = wrap(self.device) if wrap is not None else self.device
        self.driver = WireGuardUDP(driven, setup.our_socket(port), on_event=self._on_event)
        self.packets = self.driver.packets

    def _on_event(self, ev: Any) -> None:
        self.events.append(ev)
        self._changed.set()
        self._changed = trio.Event()

    def handshakes(self, initiator: bool | None = None) -> list[HandshakeCompleted]:
        return [e for e in self.events if isinstance(e, HandshakeCompleted) and (initiator is None or e.initiator == initiator)]

    async def wait_for(self, predicate: Callable[[], Any], what: str) -> Any:
        with trio.fail_after(STEP_TIMEOUT):
            while not (result := predicate()):
                await self._changed.wait()
        return result

    async def next_packet(self) -> bytes:
        with trio.fail_after(STEP_TIMEOUT):
            ev: PacketReceived = await self.packets.receive()
        assert ev.peer == self.setup.wg_public
        return ev.packet

    async def ping(self, seq: int, payload: bytes = b"") -> None:
        """Send an echo request to wireguard-go's overlay address and check the kernel's reply."""
        s = self.setup
        ident = 0x5A5A
        data = payload or os.urandom(32) + seq.to_bytes(4, "big")
        self.driver.send_packet(s.wg_public, icmp_echo(str(s.our_overlay), str(s.wg_overlay), ident, seq, data))
        while True:
            ip = parse_ipv4(await self.next_packet())
            if ip.proto != PROTO_ICMP:
                continue  # nothing else should arrive, but ignore rather than misattribute
            echo = parse_icmp_echo(ip.payload)
            assert (ip.src, ip.dst) == (s.wg_overlay, s.our_overlay)
            assert echo.is_reply and (echo.ident, echo.seq, echo.data) == (ident, seq, data)
            return


    async def ping_until_answered(self, seq: int, per_try: float = 0.25) -> int:
        """Send echo requests (seq, seq+1, ...) until one is answered; return the answered seq.

        For recovery tests, where early requests are expected to be lost.
        Replies to earlier tries may still arrive late and are accepted.
        """
        s = self.setup
        sent: set[int] = set()
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                self.driver.send_packet(s.wg_public, icmp_echo(str(s.our_overlay), str(s.wg_overlay), 0x7777, seq, b"retry"))
                sent.add(seq)
                with trio.move_on_after(per_try):
                    while True:
                        ip = parse_ipv4(await self.next_packet())
                        echo = parse_icmp_echo(ip.payload)
                        if echo.is_reply and echo.ident == 0x7777 and echo.seq in sent:
                            return echo.seq
                seq += 1

    async def kernel_pinger(self) -> trio.socket.SocketType:
        """A raw ICMP socket in wireguard-go's namespace (its echo requests go into the tunnel)."""
        return trio.socket.from_stdlib_socket(self.setup.wg_ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))


async def wait_counter(predicate: Callable[[], bool], what: str) -> None:
    """Bounded wait for a condition we can only observe by looking (counters, UAPI state)."""
    with trio.fail_after(STEP_TIMEOUT):
        while not predicate():
            await trio.sleep(0.02)


async def started(nursery: trio.Nursery, setup: WireGuardGoSetup, **kw: Any) -> PythonPeer:
    peer = PythonPeer(setup, **kw)
    await nursery.start(peer.driver.run)
    return peer


async def test_handshake_as_initiator_and_kernel_echo(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    before = time.time()
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s)
        # The first packet is staged, triggers our initiation, and is sent once the response arrives.
        await peer.ping(1)
        assert [e.initiator for e in peer.handshakes()] == [True]
        for seq in range(2, 12):
            await peer.ping(seq)
        # A full-MTU inner packet (1280 bytes on the wire inside the tunnel) also makes the round trip.
        await peer.ping(100, payload=os.urandom(1280 - 28))
        our_port = peer.driver.local_address[1]
        nursery.cancel_scope.cancel()
    status = await trio.to_thread.run_sync(lambda: s.wg.wait_handshake_after(s.our_private.public.raw, before - 1))
    assert status.endpoint == s.our_endpoint_text(our_port)
    assert status.rx_bytes > 0 and status.tx_bytes > 0
    assert peer.device.counters.handshakes_completed == 1
    assert peer.device.counters.data_received == 12
    assert peer.device.counters.total_dropped() == 0


async def test_handshake_as_responder_and_answer_kernel_ping(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)  # the endpoint wireguard-go was configured with
        # A raw ICMP socket inside wireguard-go's namespace: its echo request goes into the TUN, so
        # wireguard-go must initiate a handshake to us first.
        raw = trio.socket.from_stdlib_socket(s.wg_ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        for seq in range(1, 4):
            request = icmp_echo(str(s.wg_overlay), str(s.our_overlay), 0x1234, seq, b"kernel ping %d" % seq)
            await raw.sendto(request[20:], (str(s.our_overlay), 0))  # the kernel adds the IP header
            ip = parse_ipv4(await peer.next_packet())
            echo = parse_icmp_echo(ip.payload)
            assert (ip.src, ip.dst) == (s.wg_overlay, s.our_overlay)
            assert not echo.is_reply and (echo.ident, echo.seq, echo.data) == (0x1234, seq, b"kernel ping %d" % seq)
            # Answer it with a reply we build; the kernel delivers it to the raw socket.
            reply = icmp_echo(str(s.our_overlay), str(s.wg_overlay), echo.ident, echo.seq, echo.data, reply=True)
            peer.driver.send_packet(s.wg_public, reply)
            with trio.fail_after(STEP_TIMEOUT):
                while True:
                    got = parse_ipv4(await raw.recv(2048))
                    if got.payload[:1] != b"\x00":
                        continue  # not an echo reply (the raw socket sees all ICMP in the namespace)
                    got_echo = parse_icmp_echo(got.payload)
                    break
            assert (got.src, got.dst) == (s.our_overlay, s.wg_overlay)
            assert (got_echo.ident, got_echo.seq, got_echo.data) == (0x1234, seq, b"kernel ping %d" % seq)
        assert [e.initiator for e in peer.handshakes()] == [False]
        raw.close()
        nursery.cancel_scope.cancel()
    assert peer.device.counters.initiations_received == 1 and peer.device.counters.responses_sent == 1
    assert peer.device.counters.initiations_sent == 0


async def test_forced_rekeys_keep_traffic_flowing(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    # Rekey after 16 messages; the minimum spacing between initiations shrinks so rekeys come quickly.
    limits = Limits(rekey_after_messages=16, rekey_timeout=0.2, rekey_timeout_jitter=0.0)
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits)
        seq = 0
        with trio.fail_after(30):
            while len(peer.handshakes()) < 5:
                seq += 1
                await peer.ping(seq)  # every echo must be answered, across every key change
        # And a few more after the last rekey.
        for _ in range(20):
            seq += 1
            await peer.ping(seq)
        nursery.cancel_scope.cancel()
    assert all(e.initiator for e in peer.handshakes())
    assert peer.device.counters.handshakes_completed >= 5
    assert peer.device.counters.data_received == seq
    assert peer.device.counters.drop_data_invalid == 0 and peer.device.counters.drop_replayed == 0


async def test_our_endpoint_changes_and_wireguard_go_roams(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s)
        await peer.ping(1)
        first_port = peer.driver.local_address[1]
        assert s.wg.peer(s.our_private.public.raw).endpoint == s.our_endpoint_text(first_port)
        for round_ in range(2):
            new_sock = s.our_socket()
            new_port = new_sock.getsockname()[1]
            peer.driver.replace_socket(new_sock)  # the old socket (and port) is closed
            for seq in range(10 * (round_ + 1), 10 * (round_ + 1) + 5):
                await peer.ping(seq)  # replies can only arrive if wireguard-go followed us
            status = await trio.to_thread.run_sync(lambda: s.wg.peer(s.our_private.public.raw))
            assert status.endpoint == s.our_endpoint_text(new_port) and new_port != first_port
        nursery.cancel_scope.cancel()
    assert len(peer.handshakes()) == 1  # roaming needs no new handshake
    assert not [e for e in peer.events if isinstance(e, PeerEndpointChanged)]  # wireguard-go never moved


async def test_through_nat_both_directions(wireguard_go_behind_nat: WireGuardGoSetup) -> None:
    s = wireguard_go_behind_nat
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s)
        await peer.ping(1)  # wireguard-go has no endpoint for us: it learns the NAT mapping from our handshake
        status = await trio.to_thread.run_sync(lambda: s.wg.peer(s.our_private.public.raw))
        seen_ip, seen_port = status.endpoint.rsplit(":", 1)
        assert seen_ip == str(s.public_ip) != str(s.our_ip)
        # Now the kernel behind wireguard-go pings us: its packets reach us through the NAT mapping.
        raw = trio.socket.from_stdlib_socket(s.wg_ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        request = icmp_echo(str(s.wg_overlay), str(s.our_overlay), 0x4242, 7, b"through the nat")
        await raw.sendto(request[20:], (str(s.our_overlay), 0))
        ip = parse_ipv4(await peer.next_packet())
        echo = parse_icmp_echo(ip.payload)
        assert (echo.is_reply, echo.ident, echo.seq, echo.data) == (False, 0x4242, 7, b"through the nat")
        raw.close()
        for seq in range(2, 6):
            await peer.ping(seq)
        nursery.cancel_scope.cancel()
    assert len(peer.handshakes()) == 1


class TamperingDevice:
    """Wraps the real device: every transport datagram from wireguard-go arrives three times, first with
    one flipped bit, then genuine, then replayed."""

    def __init__(self, inner: WireGuard) -> None:
        self._inner = inner
        self.tampered = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def receive_datagrams(self, datagrams: list[tuple[bytes, Any]], now: float) -> None:
        out = []
        for data, addr in datagrams:
            if data[:1] == b"\x04" and len(data) > 32:
                self.tampered += 1
                corrupted = bytearray(data)
                corrupted[len(data) // 2] ^= 0x10
                out.append((bytes(corrupted), addr))  # must not burn the genuine counter
                out.append((data, addr))
                out.append((data, addr))  # must not be delivered twice
            else:
                out.append((data, addr))
        self._inner.receive_datagrams(out, now)


async def test_corrupted_and_replayed_datagrams_are_dropped(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, wrap=TamperingDevice)
        for seq in range(1, 11):
            await peer.ping(seq)  # a duplicate reply would show up as a wrong seq on the next ping
        with pytest.raises(trio.WouldBlock):
            peer.packets.receive_nowait()
        tampered = peer.driver.device.tampered
        nursery.cancel_scope.cancel()
    counters = peer.device.counters
    assert tampered >= 10
    assert counters.drop_data_invalid == tampered and counters.drop_replayed == tampered
    assert counters.data_received == 10


async def test_recovers_after_wireguard_go_restarts(wireguard_go_setup: WireGuardGoSetup) -> None:
    """The peer forgets our session; our side notices the silence and re-handshakes (new-handshake timer)."""
    s = wireguard_go_setup
    limits = Limits(keepalive_timeout=0.3, rekey_timeout=0.3, rekey_timeout_jitter=0.0)
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits)
        await peer.ping(1)
        await trio.to_thread.run_sync(s.restart_wireguard_go)
        answered = await peer.ping_until_answered(2)  # the first tries use the dead session and are lost
        assert answered >= 2
        await peer.ping(answered + 100)
        nursery.cancel_scope.cancel()
    assert [e.initiator for e in peer.handshakes()] == [True, True]
    assert peer.device.counters.drop_unknown_index == 0


async def test_retransmits_then_gives_up_then_recovers(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    limits = Limits(rekey_timeout=0.05, rekey_timeout_jitter=0.0, rekey_attempt_time=0.5)
    s.wg.configure(remove_peers=[s.our_private.public.raw])  # wireguard-go ignores our initiations now
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits)
        peer.driver.send_packet(s.wg_public, icmp_echo(str(s.our_overlay), str(s.wg_overlay), 1, 1, b"lost"))
        await peer.wait_for(lambda: [e for e in peer.events if isinstance(e, HandshakeFailed)], "HandshakeFailed")
        sent = peer.device.counters.initiations_sent
        assert limits.max_handshake_retries <= sent <= limits.max_handshake_retries + 2
        assert peer.device.peer_status(s.wg_public).staged_packets == 0  # the staged packet was dropped
        # Once wireguard-go knows us again, new traffic starts a fresh handshake series.
        s.wg.configure(peers=[s.our_peer_config()])
        await peer.ping(2)
        nursery.cancel_scope.cancel()
    assert [e.initiator for e in peer.handshakes()] == [True]


async def test_passive_keepalive_reaches_wireguard_go(wireguard_go_setup: WireGuardGoSetup) -> None:
    """We receive data and do not answer: after keepalive_timeout our device sends a keepalive."""
    s = wireguard_go_setup
    limits = Limits(keepalive_timeout=0.2)
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits, port=s.our_port)
        raw = await peer.kernel_pinger()
        request = icmp_echo(str(s.wg_overlay), str(s.our_overlay), 9, 9, b"unanswered")
        await raw.sendto(request[20:], (str(s.our_overlay), 0))
        await peer.next_packet()
        assert peer.device.counters.keepalives_sent == 0
        await wait_counter(lambda: peer.device.counters.keepalives_sent == 1, "our keepalive")
        # wireguard-go counts our handshake response (92 bytes), then the 32-byte keepalive.
        await wait_counter(lambda: s.wg.peer(s.our_private.public.raw).rx_bytes >= 92 + 32, "keepalive at wireguard-go")
        raw.close()
        nursery.cancel_scope.cancel()
    assert s.wg.peer(s.our_private.public.raw).rx_bytes == 92 + 32  # and nothing else
    assert peer.device.counters.keepalives_sent == 1


async def test_wireguard_go_persistent_keepalives_are_consumed(wireguard_go_setup: WireGuardGoSetup) -> None:
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)
        # Setting a persistent keepalive makes wireguard-go send one at once (handshaking first), then every second.
        s.wg.configure(peers=[s.our_peer_config(persistent_keepalive=1)])
        await wait_counter(lambda: peer.device.counters.keepalives_received >= 2, "two keepalives")
        nursery.cancel_scope.cancel()
    assert [e.initiator for e in peer.handshakes()] == [False]
    assert peer.device.counters.data_received == 0 and peer.device.counters.total_dropped() == 0


async def test_simultaneous_initiation(wireguard_go_setup: WireGuardGoSetup) -> None:
    """Both sides want to talk at once: both initiate, the handshakes cross, all packets arrive."""
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)
        raw = await peer.kernel_pinger()
        kernel_request = icmp_echo(str(s.wg_overlay), str(s.our_overlay), 0x3333, 1, b"from the kernel")
        await raw.sendto(kernel_request[20:], (str(s.our_overlay), 0))
        peer.driver.send_packet(s.wg_public, icmp_echo(str(s.our_overlay), str(s.wg_overlay), 0x4444, 1, b"from us"))
        got = set()
        while len(got) < 2:
            echo = parse_icmp_echo(parse_ipv4(await peer.next_packet()).payload)
            got.add((echo.is_reply, echo.ident, echo.data))
        assert got == {(False, 0x3333, b"from the kernel"), (True, 0x4444, b"from us")}
        for seq in range(2, 6):
            await peer.ping(seq)
        raw.close()
        nursery.cancel_scope.cancel()
    assert peer.handshakes()


async def test_ipv6_outer_transport(wireguard_go_over_ipv6: WireGuardGoSetup) -> None:
    """Same WireGuard over UDP/IPv6 (the inner packets stay IPv4); both directions, and no spurious roaming."""
    s = wireguard_go_over_ipv6
    assert s.our_ip.version == 6 and ":" in s.wg_endpoint[0]
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)
        await peer.ping(1)
        raw = await peer.kernel_pinger()
        await raw.sendto(icmp_echo(str(s.wg_overlay), str(s.our_overlay), 5, 5, b"v6")[20:], (str(s.our_overlay), 0))
        echo = parse_icmp_echo(parse_ipv4(await peer.next_packet()).payload)
        assert (echo.is_reply, echo.data) == (False, b"v6")
        raw.close()
        nursery.cancel_scope.cancel()
    assert s.wg.peer(s.our_private.public.raw).endpoint == s.our_endpoint_text(s.our_port)
    assert peer.device.peer_status(s.wg_public).endpoint == s.wg_endpoint
    assert not [e for e in peer.events if isinstance(e, PeerEndpointChanged)]


async def test_wireguard_go_reinitiates_after_restart(wireguard_go_setup: WireGuardGoSetup) -> None:
    """A restarted wireguard-go initiates to us while we still hold the old session: we must accept it."""
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)
        await peer.ping(1)
        await trio.to_thread.run_sync(s.restart_wireguard_go)
        raw = await peer.kernel_pinger()
        await raw.sendto(icmp_echo(str(s.wg_overlay), str(s.our_overlay), 6, 6, b"after restart")[20:], (str(s.our_overlay), 0))
        echo = parse_icmp_echo(parse_ipv4(await peer.next_packet()).payload)
        assert (echo.is_reply, echo.data) == (False, b"after restart")
        raw.close()
        await peer.ping(2)  # and our direction uses the new session at once
        nursery.cancel_scope.cancel()
    assert [e.initiator for e in peer.handshakes()] == [True, False]


async def test_cookie_reply_under_load_is_accepted_by_wireguard_go(wireguard_go_setup: WireGuardGoSetup) -> None:
    """Under load we answer wireguard-go's initiation with a cookie reply; it retries (after its 5 s
    REKEY_TIMEOUT) with a valid mac2, which we accept."""
    s = wireguard_go_setup
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, port=s.our_port)
        peer.device.set_under_load(True)
        raw = await peer.kernel_pinger()
        await raw.sendto(icmp_echo(str(s.wg_overlay), str(s.our_overlay), 8, 8, b"cookie")[20:], (str(s.our_overlay), 0))
        with trio.fail_after(STEP_TIMEOUT):
            ev = await peer.packets.receive()
        echo = parse_icmp_echo(parse_ipv4(ev.packet).payload)
        assert (echo.is_reply, echo.data) == (False, b"cookie")
        raw.close()
        nursery.cancel_scope.cancel()
    c = peer.device.counters
    assert c.cookie_replies_sent >= 1 and c.drop_needs_cookie >= 1
    assert [e.initiator for e in peer.handshakes()] == [False]


def _initiation_with_valid_mac1(receiver_static: bytes) -> bytes:
    """148 bytes: type 1, random body, a correct mac1 for ``receiver_static`` and zero mac2.

    Garbage that passes wireguard-go's cheap check and costs it a DH each: a handshake flood."""
    import hashlib

    mac1_key = hashlib.blake2s(b"mac1----" + receiver_static).digest()
    body = b"\x01\x00\x00\x00" + os.urandom(112)
    return body + hashlib.blake2s(body, key=mac1_key, digest_size=16).digest() + bytes(16)


async def test_we_consume_wireguard_go_cookie_replies(wireguard_go_setup: WireGuardGoSetup) -> None:
    """Flood wireguard-go with handshake-shaped garbage so it goes under load; our initiation then
    gets a cookie reply, which we must decrypt and use (mac2) on our retry."""
    s = wireguard_go_setup
    limits = Limits(rekey_timeout=0.2, rekey_timeout_jitter=0.0)
    flood = s.our_socket()
    flood.setblocking(False)
    junk = [_initiation_with_valid_mac1(s.wg_public.raw) for _ in range(64)]
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits)
        for attempt in range(5):
            for i in range(3000):
                try:
                    flood.sendto(junk[i % len(junk)], s.wg_endpoint)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(flood)
            if attempt == 0:
                peer.driver.send_packet(s.wg_public, icmp_echo(str(s.our_overlay), str(s.wg_overlay), 3, 3, b"x"))
            if peer.device.counters.cookie_replies_received or peer.handshakes():
                break
            await trio.sleep(0.05)  # pacing between flood rounds, not synchronisation
        await peer.wait_for(peer.handshakes, "handshake")
        nursery.cancel_scope.cancel()
    flood.close()
    c = peer.device.counters
    assert c.cookie_replies_received >= 1, "wireguard-go never went under load"
    assert c.drop_cookie_invalid == 0


async def test_time_based_rekey_keeps_traffic_flowing(wireguard_go_setup: WireGuardGoSetup) -> None:
    """REKEY_AFTER_TIME / REJECT_AFTER_TIME shrunk to fractions of a second: sessions age out and are
    replaced while pings keep being answered."""
    s = wireguard_go_setup
    limits = Limits(
        rekey_after_time=0.4, reject_after_time=1.2, keepalive_timeout=0.3, rekey_timeout=0.2, rekey_timeout_jitter=0.0
    )
    async with trio.open_nursery() as nursery:
        peer = await started(nursery, s, limits=limits)
        seq = 0
        with trio.fail_after(20):
            while len(peer.handshakes()) < 4:
                seq += 1
                await peer.ping(seq)
                await trio.sleep(0.02)  # pacing: let sessions age between pings
        nursery.cancel_scope.cancel()
    assert all(e.initiator for e in peer.handshakes())
    assert peer.device.counters.data_received == seq
    assert peer.device.counters.drop_expired_keypair == 0
