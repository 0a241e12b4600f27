"""Our userspace TCP/IP stack against the Linux kernel's, through Debian wireguard-go.

wireguard-go runs on a TUN (MTU 1280) in the ``wg`` namespace with an IPv4 and a ULA
IPv6 overlay address; our NetStack (``open_static_peer``: our WireGuard over one UDP
socket in the ``py`` namespace) holds the peer addresses .2 and ::2. Everything the
kernel sends us and everything it accepts from us is checked by a real TCP/IP stack:
checksums, sequence numbers, windows, options, RST and FIN handling.

Bulk transfers use a kernel peer *process* (tests/interop/netstack_helpers.py run as a
script in the namespace) so that the kernel side does not share our interpreter; edge
cases use kernel sockets created in the namespace and driven from this trio loop.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import re
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.interop.conftest import dump_wireguard_go_log
from tests.interop.netstack_helpers import (
    NetstackSetup,
    kernel_receive_all,
    kernel_receive_exactly,
    kernel_send_all,
    make_netstack_setup,
    receive_all,
    run_kernel_peer,
    send_random,
)
from tests.lab import Lab

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
BULK = 64 * MiB  # per direction and address family
LOSSY_BULK = 32 * MiB  # under 3 % loss: our sender recovers more slowly than Linux (see the report)
STEP_TIMEOUT = 10.0  # bound for one small step (connect, a short exchange)
BULK_TIMEOUT = 120.0  # bound for one bulk transfer (64 MiB at >= 5 Mbit/s)


@pytest.fixture
def ns_setup(lab: Lab) -> Iterator[NetstackSetup]:
    s = make_netstack_setup(lab)
    try:
        yield s
    finally:
        dump_wireguard_go_log(s.wgs)


def report_connection(stream: Any, what: str) -> None:
    """Print the TCP core's counters (shown by pytest on failure or with -s); no core may have hit a bug."""
    conn = getattr(stream, "connection", None)
    if conn is None:  # the kernel stand-in (harness self-check)
        return
    st = conn.stats
    print(f"{what}: retransmits={st.retransmits} fast={st.fast_retransmits} timeouts={st.timeouts} "
          f"dropped={st.dropped} srtt={st.srtt} rto={st.rto:.3f} cwnd={st.cwnd} ssthresh={st.ssthresh}")
    assert getattr(conn, "internal_errors", 0) == 0, "the TCP core caught an internal error"


@asynccontextmanager
async def our_stack(s: NetstackSetup) -> AsyncIterator[Any]:
    """Our NetStack for one test; on a clean exit, nothing the kernel sent may have looked broken to it."""
    async with s.our_stack() as net:
        yield net
        stack = getattr(net, "stack", None)
        if stack is not None:  # not the kernel stand-in
            c = stack.counters
            assert (c.malformed, c.bad_checksum, c.internal_errors) == (0, 0, 0), c.as_dict()


# -- bulk transfer building blocks ----------------------------------------------------------------------------------


async def python_sends_to_kernel(s: NetstackSetup, net: Any, version: int, size: int, *, before_data: Any = None) -> None:
    """A Python client sends ``size`` bytes to a kernel server; the kernel's SHA-256 must match ours."""
    lsock, port = s.kernel_listener(version)
    box: dict[str, Any] = {}
    with trio.fail_after(BULK_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def kernel() -> None:
                box["k"] = await run_kernel_peer(s.kernel_ns, "recv", lsock.fileno(), pass_fds=[lsock.fileno()])

            nursery.start_soon(kernel)
            stream = await net.open_tcp_stream(s.kernel_addr(version), port, timeout=STEP_TIMEOUT)
            if before_data is not None:
                before_data()
            sent = await send_random(stream, size)
            await stream.send_eof()
            report_connection(stream, f"Python->kernel IPv{version}")
            # The kernel peer closes after reading to EOF: our EOF, the kernel's, both FINs acknowledged.
            assert (await receive_all(stream)).nbytes == 0
            await stream.aclose()
    lsock.close()
    k = box["k"]
    assert (k.nbytes, k.sha256) == (size, sent.sha256), f"kernel received {k.nbytes} bytes, digest mismatch"
    print(f"Python->kernel IPv{version}: {size / MiB:.0f} MiB at {size * 8 / k.data['seconds'] / 1e6:.0f} Mbit/s")


async def kernel_sends_to_python(s: NetstackSetup, net: Any, version: int, size: int, port: int = 5201) -> None:
    """A kernel client sends ``size`` bytes to a Python listener; our SHA-256 must match the kernel's."""
    listener = await net.open_tcp_listener(port)
    box: dict[str, Any] = {}
    with trio.fail_after(BULK_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def kernel() -> None:
                box["k"] = await run_kernel_peer(s.kernel_ns, "connect-send", s.our_addr(version), port, size)

            nursery.start_soon(kernel)
            stream = await listener.accept()
            got = await receive_all(stream)
            report_connection(stream, f"kernel->Python IPv{version}")
            await stream.aclose()  # our FIN ends the kernel peer's wait for EOF
    await listener.aclose()
    k = box["k"]
    assert k.nbytes == size and k.data["peer_sent"] == 0
    assert (got.nbytes, got.sha256) == (size, k.sha256), f"we received {got.nbytes} bytes, digest mismatch"
    print(f"kernel->Python IPv{version}: {size / MiB:.0f} MiB at {got.mbit_per_s:.0f} Mbit/s")


# -- 1. ICMP echo from the kernel -----------------------------------------------------------------------------------


async def test_kernel_ping_v4_and_v6_get_replies(ns_setup: NetstackSetup) -> None:
    s = ns_setup
    async with our_stack(s) as net:
        assert net is not None
        for version in (4, 6):
            args = ["ping", "-6"] if version == 6 else ["ping", "-4"]
            args += ["-c", "3", "-W", "2", "-i", "0.2", s.our_addr(version)]
            # ping blocks: run it in a thread while our stack keeps answering in this trio loop.
            out = await trio.to_thread.run_sync(lambda: s.kernel_ns.run(args, check=False, timeout=30))
            assert "3 received" in out and "DUP" not in out and "wrong data" not in out, out
        # Full-MTU echoes: 1252 + 28 (v4) and 1232 + 48 (v6) bytes fill the 1280-byte tunnel exactly.
        for version, size in ((4, 1252), (6, 1232)):
            args = ["ping", f"-{version}", "-c", "2", "-W", "2", "-i", "0.2", "-s", str(size), s.our_addr(version)]
            out = await trio.to_thread.run_sync(lambda: s.kernel_ns.run(args, check=False, timeout=30))
            assert "2 received" in out and "wrong data" not in out, out
        # A 3000-byte echo arrives as three kernel-made IPv4 fragments: we reassemble it, and (by design,
        # we never fragment) drop the oversize reply and count it instead of answering.
        if (stack := getattr(net, "stack", None)) is not None:
            args = ["ping", "-4", "-c", "1", "-W", "1", "-s", "3000", s.our_addr(4)]
            await trio.to_thread.run_sync(lambda: s.kernel_ns.run(args, check=False, timeout=30))
            assert stack.counters.reassembled == 1 and stack.counters.oversize_reply_dropped == 1, stack.counters


# -- 2. 64 MiB both ways, IPv4 and IPv6 -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
async def test_bulk_python_to_kernel(ns_setup: NetstackSetup, version: int) -> None:
    async with our_stack(ns_setup) as net:
        await python_sends_to_kernel(ns_setup, net, version, BULK)


@pytest.mark.parametrize("version", [4, 6])
async def test_bulk_kernel_to_python(ns_setup: NetstackSetup, version: int) -> None:
    async with our_stack(ns_setup) as net:
        await kernel_sends_to_python(ns_setup, net, version, BULK)


# -- 3. the same under 3 % random loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
async def test_bulk_both_ways_under_3_percent_loss(ns_setup: NetstackSetup, version: int) -> None:
    s = ns_setup
    async with our_stack(s) as net:
        # Loss starts once the connection is up, so the WireGuard handshake (5 s retry) is not at stake.
        await python_sends_to_kernel(s, net, version, LOSSY_BULK, before_data=lambda: s.add_loss(0.03))
        dropped = s.dropped_by_loss()
        assert dropped > 0, "the loss rules dropped nothing"
        await kernel_sends_to_python(s, net, version, LOSSY_BULK)
        assert s.dropped_by_loss() > dropped


# -- 4. many concurrent short connections from the kernel --------------------------------------------------------


async def test_500_concurrent_kernel_connections_are_served(ns_setup: NetstackSetup) -> None:
    s = ns_setup
    n = 500
    served = 0
    async with our_stack(s) as net:
        listener = await net.open_tcp_listener(7, backlog=n)

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            async with trio.open_nursery() as handlers:
                while True:
                    try:
                        stream = await listener.accept()
                    except trio.ClosedResourceError:
                        break  # the handlers still finish: every connection is closed cleanly
                    handlers.start_soon(echo_stream, stream)

        async def echo_stream(stream: Any) -> None:
            nonlocal served
            async with stream:
                buf = bytearray()
                while data := await stream.receive_some(64):
                    buf += data
                await stream.send_all(bytes(buf))
            served += 1

        socks = s.kernel_sockets(n)
        answers: dict[int, bytes] = {}

        async def client(i: int, sock: trio.socket.SocketType) -> None:
            with sock:
                await sock.connect((s.our_addr(4), 7))
                await sock.send(struct.pack(">Q", i))
                sock.shutdown(socket.SHUT_WR)
                answers[i] = await kernel_receive_all(sock)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                async with trio.open_nursery() as clients:
                    for i, sock in enumerate(socks):
                        clients.start_soon(client, i, sock)
                await listener.aclose()
    assert len(answers) == n
    assert all(answers[i] == struct.pack(">Q", i) for i in range(n))
    assert served == n


# -- 5. edge cases ------------------------------------------------------------------------------------------------


async def test_half_close_python_client(ns_setup: NetstackSetup) -> None:
    """We send a request and EOF; the kernel reads to EOF, then answers; we still receive everything."""
    s = ns_setup
    reply = bytes(range(256)) * 400  # 100 KiB after our FIN
    async with our_stack(s) as net:
        server = s.kernel_socket(4)
        await server.bind((s.kernel_addr(4), 0))
        server.listen(1)
        port = server.getsockname()[1]
        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def kernel() -> None:
                    conn, _ = await server.accept()
                    with conn:
                        assert await kernel_receive_all(conn) == b"request"
                        await kernel_send_all(conn, reply)

                nursery.start_soon(kernel)
                stream = await net.open_tcp_stream(s.kernel_addr(4), port, timeout=STEP_TIMEOUT)
                await stream.send_all(b"request")
                await stream.send_eof()
                got = await receive_all(stream)
                await stream.aclose()
        server.close()
    assert got.nbytes == len(reply)
    assert got.sha256 == hashlib.sha256(reply).hexdigest()


async def test_half_close_kernel_client(ns_setup: NetstackSetup) -> None:
    """The kernel sends and shuts down writing; we read to EOF, then answer on the half-open connection."""
    s = ns_setup
    reply = bytes(range(256)) * 400
    async with our_stack(s) as net:
        listener = await net.open_tcp_listener(8080)
        client = s.kernel_socket(6)
        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def kernel() -> None:
                    await client.connect((s.our_addr(6), 8080))
                    await kernel_send_all(client, b"hello from the kernel")
                    client.shutdown(socket.SHUT_WR)
                    nursery_box["got"] = await kernel_receive_all(client)

                nursery_box: dict[str, bytes] = {}
                nursery.start_soon(kernel)
                stream = await listener.accept()
                request = await receive_all(stream)
                assert request.nbytes == len(b"hello from the kernel")
                await stream.send_all(reply)
                await stream.aclose()
        client.close()
        await listener.aclose()
    assert nursery_box["got"] == reply


def _is_reset(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionResetError):
        return True
    return isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ConnectionResetError)


def _linger_zero(sock: trio.socket.SocketType) -> None:
    # SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_kernel_rst_while_python_sends(ns_setup: NetstackSetup) -> None:
    s = ns_setup
    async with our_stack(s) as net:
        server = s.kernel_socket(4)
        await server.bind((s.kernel_addr(4), 0))
        server.listen(1)
        port = server.getsockname()[1]
        with trio.fail_after(STEP_TIMEOUT * 3):
            async with trio.open_nursery() as nursery:

                async def kernel() -> None:
                    conn, _ = await server.accept()
                    await kernel_receive_exactly(conn, 64 * 1024)  # mid-transfer
                    _linger_zero(conn)
                    conn.close()

                nursery.start_soon(kernel)
                stream = await net.open_tcp_stream(s.kernel_addr(4), port, timeout=STEP_TIMEOUT)
                with pytest.raises((ConnectionResetError, trio.BrokenResourceError)) as caught:
                    await send_random(stream, 256 * MiB)  # far more than ever fits in flight
                assert _is_reset(caught.value), repr(caught.value)
                await stream.aclose()
        server.close()


async def test_kernel_rst_while_python_receives(ns_setup: NetstackSetup) -> None:
    s = ns_setup
    async with our_stack(s) as net:
        server = s.kernel_socket(6)
        await server.bind((s.kernel_addr(6), 0))
        server.listen(1)
        port = server.getsockname()[1]
        with trio.fail_after(STEP_TIMEOUT * 3):
            async with trio.open_nursery() as nursery:

                async def kernel() -> None:
                    conn, _ = await server.accept()
                    await kernel_send_all(conn, b"x" * 100_000)
                    _linger_zero(conn)
                    conn.close()

                nursery.start_soon(kernel)
                stream = await net.open_tcp_stream(s.kernel_addr(6), port, timeout=STEP_TIMEOUT)
                received = 0
                with pytest.raises((ConnectionResetError, trio.BrokenResourceError)) as caught:
                    while True:
                        data = await stream.receive_some(65536)
                        assert data, "a reset connection must not look like a clean EOF"
                        received += len(data)
                assert _is_reset(caught.value), repr(caught.value)
                assert received <= 100_000
                await stream.aclose()
        server.close()


@pytest.mark.parametrize("version", [4, 6])
async def test_connect_to_closed_kernel_port_is_refused_at_once(ns_setup: NetstackSetup, version: int) -> None:
    s = ns_setup
    probe = s.kernel_socket(version)
    await probe.bind((s.kernel_addr(version), 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # bound, never listened: the port is closed, the kernel answers SYNs with RST
    async with our_stack(s) as net:
        start = trio.current_time()
        with pytest.raises(ConnectionRefusedError):
            await net.open_tcp_stream(s.kernel_addr(version), closed_port, timeout=STEP_TIMEOUT)
        # "At once": one round trip plus a WireGuard handshake, far below the connect timeout.
        assert trio.current_time() - start < 3.0
        # The stack is still fine afterwards.
        lsock, port = s.kernel_listener(version)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_kernel_peer(s.kernel_ns, "recv", lsock.fileno(), pass_fds=[lsock.fileno()]))
            stream = await net.open_tcp_stream(s.kernel_addr(version), port, timeout=STEP_TIMEOUT)
            await stream.send_all(b"still works")
            await stream.aclose()
        lsock.close()


@pytest.mark.parametrize("version", [4, 6])
async def test_connect_to_silent_port_times_out_as_configured(ns_setup: NetstackSetup, version: int) -> None:
    s = ns_setup
    tool = "iptables" if version == 4 else "ip6tables"
    # Routed to wireguard-go and delivered to the kernel, which drops the SYNs without a word.
    s.kernel_ns.run([tool, "-w", "-A", "INPUT", "-i", s.tun, "-p", "tcp", "--dport", "9", "-j", "DROP"])
    timeout = 1.5
    async with our_stack(s) as net:
        # Bring the WireGuard session up first, so the timeout covers TCP alone.
        out = await trio.to_thread.run_sync(
            lambda: s.kernel_ns.run(["ping", f"-{version}", "-c", "1", "-W", "5", s.our_addr(version)], check=False)
        )
        assert "1 received" in out, out
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await net.open_tcp_stream(s.kernel_addr(version), 9, timeout=timeout)
        elapsed = trio.current_time() - start
        assert timeout - 0.05 <= elapsed < timeout + 1.0, elapsed


# -- beyond the list: what the kernel negotiated with us, and UDP ------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("opener", ["python", "kernel"])
async def test_tcp_options_negotiated_with_the_kernel(ns_setup: NetstackSetup, version: int, opener: str) -> None:
    """SACK, timestamps and window scaling agreed on both ends, whichever side sent the SYN.

    The kernel's view comes from ``ss -ti`` in its namespace: its ``wscale:snd,rcv`` must be the
    mirror image of ours, and its sending MSS is our advertised MSS (1280 - IP header - 20) minus the
    12 bytes of the timestamp option, which it only subtracts when timestamps were agreed.
    """
    s = ns_setup
    async with our_stack(s) as net:
        with trio.fail_after(STEP_TIMEOUT):
            if opener == "python":
                server = s.kernel_socket(version)
                await server.bind((s.kernel_addr(version), 0))
                server.listen(1)
                kport = server.getsockname()[1]
                stream = await net.open_tcp_stream(s.kernel_addr(version), kport, timeout=STEP_TIMEOUT)
                kconn, _ = await server.accept()
                server.close()
            else:
                listener = await net.open_tcp_listener(6000)
                kconn = s.kernel_socket(version)
                await kconn.connect((s.our_addr(version), 6000))
                stream = await listener.accept()
                await listener.aclose()
                kport = kconn.getsockname()[1]
            await stream.send_all(b"x" * 5000)  # some data, so the kernel has measured and sized everything
            await kernel_receive_exactly(kconn, 5000)
        info = await trio.to_thread.run_sync(
            lambda: s.kernel_ns.run(["ss", "-tinH", "state", "established", f"( sport = :{kport} )"])
        )
        ours = getattr(stream, "connection", None)
        await stream.aclose()
        kconn.close()
    m = re.search(r"wscale:(\d+),(\d+)", info)
    assert m is not None, f"the kernel did not agree to window scaling: {info}"
    our_mss = 1280 - (20 if version == 4 else 40) - 20
    assert f" mss:{our_mss - 12} " in f" {info} ", f"timestamps not agreed or wrong MSS: {info}"
    if ours is not None:  # not the kernel stand-in
        assert ours.sack_ok and ours.ts_ok, "we did not agree to SACK/timestamps the kernel offered"
        assert (ours.rcv_wscale, ours.snd_wscale) == (int(m.group(1)), int(m.group(2))), info


@pytest.mark.parametrize("version", [4, 6])
async def test_udp_with_the_kernel(ns_setup: NetstackSetup, version: int) -> None:
    """Datagrams both ways up to the largest unfragmented size; EMSGSIZE above it; ICMP port unreachable
    from the kernel surfaces as ConnectionRefusedError on a connected socket."""
    s = ns_setup
    limit = 1252 if version == 4 else 1232
    async with our_stack(s) as net:
        udp = await net.open_udp_socket(port=5353)
        k = s.kernel_socket(version, socket.SOCK_DGRAM)
        await k.bind((s.kernel_addr(version), 0))
        kport = k.getsockname()[1]
        with trio.fail_after(STEP_TIMEOUT):
            for payload in (b"q", bytes(range(256)) * 2, bytes(limit)):
                await k.sendto(payload, (s.our_addr(version), 5353))
                data, (src_ip, src_port) = await udp.recvfrom(65535)
                assert data == payload
                assert (ipaddress.ip_address(src_ip), src_port) == (ipaddress.ip_address(s.kernel_addr(version)), kport)
                await udp.sendto(data[::-1], (src_ip, src_port))
                got, src = await k.recvfrom(4096)
                assert got == payload[::-1]
                assert (ipaddress.ip_address(src[0]), src[1]) == (ipaddress.ip_address(s.our_addr(version)), 5353)
            with pytest.raises(OSError) as too_big:
                await udp.sendto(bytes(limit + 1), (s.kernel_addr(version), kport))
            assert too_big.value.errno == errno.EMSGSIZE
            k.close()  # now the kernel's port is closed: it answers with ICMP port unreachable
            connected = await net.open_udp_socket()
            await connected.connect((s.kernel_addr(version), kport))
            await connected.send(b"anyone?")
            with pytest.raises(ConnectionRefusedError):
                await connected.recv()
            connected.close()
        udp.close()
