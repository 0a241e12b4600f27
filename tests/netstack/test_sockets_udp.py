"""UDP sockets on two NetStacks joined in memory."""

from __future__ import annotations

import errno

import pytest
import trio

from tests.netstack.netutil import A4, A6, B4, B6, netstack_pair


@pytest.mark.parametrize("a_ip,b_ip", [(A4, B4), (A6, B6)])
async def test_udp_both_directions(a_ip: str, b_ip: str) -> None:
    async with netstack_pair() as (a, b, _link):
        server = await b.open_udp_socket(port=5353)
        client = await a.open_udp_socket()
        assert server.getsockname() == ("0.0.0.0", 5353)
        with trio.fail_after(5):
            assert await client.sendto(b"ping", (b_ip, 5353)) == 4
            data, addr = await server.recvfrom(65535)
            assert data == b"ping" and addr == (a_ip, client.getsockname()[1])
            await server.sendto(b"pong", addr)
            assert await client.recvfrom(2) == (b"po", (b_ip, 5353))  # truncated to bufsize
        await client.aclose()
        await server.aclose()


async def test_udp_connected_mode_and_protocols() -> None:
    async with netstack_pair() as (a, b, _link):
        server = await b.open_udp_socket(host=B4, port=7)
        assert server.getsockname() == (B4, 7)
        other = await a.open_udp_socket()
        conn = await a.open_udp_socket()
        await conn.connect((B4, 7))  # may be awaited like trio's, or called plainly
        assert conn.getpeername() == (B4, 7)
        with trio.fail_after(5):
            await conn.send(b"hello")
            data, addr = await server.recvfrom(100)
            assert data == b"hello"
            await other.sendto(b"not from the peer", (B4, 7))
            await server.sendto(b"from other port", (A4, other.getsockname()[1]))
            await server.sendto(b"reply", addr)
            assert await conn.receive() == b"reply"  # UDPConnection protocol
            assert await other.recv(100) == b"from other port"
        await conn.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await conn.send(b"x")


async def test_udp_port_unreachable_refuses_connected_socket() -> None:
    async with netstack_pair() as (a, _b, _link):
        sock = await a.open_udp_socket()
        sock.connect((B4, 9))  # nobody listens there: B answers ICMP port unreachable
        await sock.send(b"anyone?")
        with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
            await sock.recv()
        sock.close()


async def test_udp_errors() -> None:
    async with netstack_pair() as (a, _b, _link):
        sock = await a.open_udp_socket(port=1000)
        with pytest.raises(OSError) as e:
            await a.open_udp_socket(port=1000)
        assert e.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as e:
            await sock.sendto(b"x" * 1300, (B4, 1))
        assert e.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as e:
            await sock.send(b"x")
        assert e.value.errno == errno.EDESTADDRREQ
        with pytest.raises(ValueError):
            await sock.sendto(b"x", ("example.com", 1))

        async def blocked_receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await sock.recvfrom()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_receive)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()  # wakes the receiver


async def test_dns_server_over_netstack_udp() -> None:
    """MagicDNS's server loop accepts our UDPSocket as its DatagramSocket."""
    from tsnet.dns import server as dns_server

    assert hasattr(dns_server, "DatagramSocket")
    async with netstack_pair() as (a, b, _link):
        sock = await b.open_udp_socket(port=53)
        client = await a.open_udp_socket()
        await client.sendto(b"\x12\x34" + b"\x00" * 10, (B4, 53))
        with trio.fail_after(5):
            data, addr = await sock.recvfrom(512)
        assert data[:2] == b"\x12\x34" and addr[0] == A4
