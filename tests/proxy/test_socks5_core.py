"""The sans-IO SOCKS5 handshake and the UDP datagram codec."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.proxy.socks5 import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    Credentials,
    Rejected,
    Request,
    Socks5Error,
    Socks5Handshake,
    build_udp_datagram,
    encode_address,
    parse_udp_datagram,
)

GREETING = b"\x05\x01\x00"


def connect_request(host: str, port: int, command: int = CMD_CONNECT) -> bytes:
    return bytes((5, command, 0)) + encode_address(host, port)


def test_no_auth_connect_by_name_with_early_data() -> None:
    hs = Socks5Handshake()
    event = hs.receive_data(GREETING + connect_request("web.tailnet.test", 8080) + b"GET / ")
    assert event == Request(CMD_CONNECT, "web.tailnet.test", 8080, 3)
    assert hs.data_to_send() == b"\x05\x00"
    assert hs.trailing_data == b"GET / "
    hs.reply(0, "127.0.0.1", 4242)
    assert hs.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92"
    assert hs.state == "established"


def test_byte_by_byte_ipv6_udp_associate() -> None:
    hs = Socks5Handshake()
    data = GREETING + connect_request("::1", 53, CMD_UDP_ASSOCIATE)
    events = [hs.receive_data(data[i : i + 1]) for i in range(len(data))]
    assert events[:-1] == [None] * (len(data) - 1)
    assert events[-1] == Request(CMD_UDP_ASSOCIATE, "::1", 53, 4)


def test_username_password_auth() -> None:
    creds = Credentials("alice", "pw")
    hs = Socks5Handshake(creds)
    assert hs.receive_data(b"\x05\x02\x00\x02") is None
    assert hs.data_to_send() == b"\x05\x02"
    event = hs.receive_data(b"\x01\x05alice\x02pw" + connect_request("1.2.3.4", 80))
    assert isinstance(event, Request)
    assert hs.data_to_send() == b"\x01\x00"

    bad = Socks5Handshake(creds)
    event = bad.receive_data(b"\x05\x01\x02\x01\x05alice\x02no")
    assert isinstance(event, Rejected) and event.reason == "authentication failed"
    assert bad.data_to_send() == b"\x05\x02\x01\x01"


@pytest.mark.parametrize(
    ("credentials", "greeting"),
    [(None, b"\x05\x01\x02"), (Credentials("a", "b"), b"\x05\x01\x00"), (None, b"\x05\x00")],
)
def test_no_acceptable_method(credentials: Credentials | None, greeting: bytes) -> None:
    hs = Socks5Handshake(credentials)
    assert isinstance(hs.receive_data(greeting), Rejected)
    assert hs.data_to_send() == b"\x05\xff"


def test_bad_versions() -> None:
    socks4 = Socks5Handshake()
    assert isinstance(socks4.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"), Rejected)
    assert socks4.data_to_send() == b"\x00\x5b" + b"\x00" * 6
    garbage = Socks5Handshake()
    assert isinstance(garbage.receive_data(b"GET / HTTP/1.1\r\n"), Rejected)
    assert garbage.data_to_send() == b"\x05\xff"
    bad_request = Socks5Handshake()
    event = bad_request.receive_data(GREETING + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert isinstance(event, Rejected) and event.reply_code == 1
    assert bad_request.data_to_send() == b"\x05\x00" + b"\x05\x01\x00\x01" + b"\x00" * 6
    bad_auth = Socks5Handshake(Credentials("a", "b"))
    assert isinstance(bad_auth.receive_data(b"\x05\x01\x02\x05\x01a\x01b"), Rejected)
    assert bad_auth.data_to_send() == b"\x05\x02\x01\x01"


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07),  # BIND
        (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07),  # unknown command
        (b"\x05\x01\x00\x09\x7f\x00\x00\x01\x00\x50", 0x08),  # unknown address type
        (b"\x05\x01\x00\x03\x00\x00\x50", 0x01),  # empty name
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", 0x01),  # non-ASCII name
    ],
)
def test_request_refusals(request_bytes: bytes, code: int) -> None:
    hs = Socks5Handshake()
    event = hs.receive_data(GREETING + request_bytes)
    assert isinstance(event, Rejected) and event.reply_code == code
    reply = hs.data_to_send()[2:]
    assert reply[:2] == bytes((5, code)) and len(reply) == 10
    assert hs.state == "closed"


def test_reply_only_when_awaiting() -> None:
    with pytest.raises(RuntimeError):
        Socks5Handshake().reply(0)


def test_udp_datagram_codec() -> None:
    packet = build_udp_datagram("dns.tailnet.test", 53, b"query")
    parsed = parse_udp_datagram(packet)
    assert (parsed.host, parsed.port, parsed.payload) == ("dns.tailnet.test", 53, b"query")
    v6 = parse_udp_datagram(build_udp_datagram("fd7a:115c:a1e0::1", 9, b""))
    assert (v6.host, v6.port, v6.payload) == ("fd7a:115c:a1e0::1", 9, b"")
    with pytest.raises(Socks5Error):
        parse_udp_datagram(b"\x00\x00\x01" + packet[3:])  # fragment
    with pytest.raises(Socks5Error):
        parse_udp_datagram(packet[:8])
    with pytest.raises(Socks5Error):
        parse_udp_datagram(b"\x00\x00\x00\x07rest")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80), st.booleans(), st.integers(1, 7))
def test_random_input_never_raises(data: bytes, with_auth: bool, step: int) -> None:
    hs = Socks5Handshake(Credentials("u", "p") if with_auth else None)
    for i in range(0, len(data), step):
        event = hs.receive_data(data[i : i + step])
        assert event is None or isinstance(event, Request | Rejected)
        if event is not None:
            break
    hs.data_to_send()
    try:
        parse_udp_datagram(data)
    except Socks5Error:
        pass
