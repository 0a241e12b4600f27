"""STUN bytes against the worked examples in the protocol notes."""

import pytest
import trio

from tsnet.derp import stun
from tsnet.derp.server import DerpServer

TXID = bytes(range(12))
REQUEST = bytes.fromhex(
    "00 01 00 14 21 12 a4 42 00 01 02 03 04 05 06 07 08 09 0a 0b 80 22 00 08 74 61 69 6c 6e 6f 64 65 "
    "80 28 00 04 8a ab ad 90".replace(" ", "")
)
RESPONSE = bytes.fromhex(
    "01 01 00 0c 21 12 a4 42 00 01 02 03 04 05 06 07 08 09 0a 0b 00 20 00 08 00 01 83 bb 5e 12 a4 43".replace(" ", "")
)


def test_request_matches_notes():
    assert stun.build_request(TXID) == REQUEST
    assert stun.parse_request(REQUEST) == TXID


def test_response_matches_notes():
    assert stun.build_response(TXID, ("127.0.0.1", 41641)) == RESPONSE
    assert stun.handle_request(REQUEST, ("127.0.0.1", 41641)) == RESPONSE
    parsed = stun.parse_response(RESPONSE)
    assert parsed.txid == TXID and parsed.addr == ("127.0.0.1", 41641)


def test_ipv6_response_round_trip_and_mapped_unmapped():
    resp = stun.build_response(TXID, ("2001:db8::5", 3478))
    assert resp[2:4] == b"\x00\x18" and resp[24:26] == b"\x00\x02"
    assert stun.parse_response(resp).addr == ("2001:db8::5", 3478)
    mapped = stun.build_response(TXID, ("::ffff:10.1.2.3", 9))
    assert stun.parse_response(mapped).addr == ("10.1.2.3", 9)


def test_mapped_address_fallback_and_trailing_bytes():
    attr = bytes.fromhex("0001 0008 0001 1f90 0a000001".replace(" ", ""))
    msg = b"\x01\x01" + len(attr).to_bytes(2, "big") + stun.MAGIC_COOKIE + TXID + attr + b"junk"
    assert stun.parse_response(msg).addr == ("10.0.0.1", 8080)


@pytest.mark.parametrize(
    "packet",
    [
        REQUEST[:-1] + bytes([REQUEST[-1] ^ 1]),  # bad fingerprint
        REQUEST.replace(b"tailnode", b"tailnodf"),  # wrong software (fingerprint also wrong)
        REQUEST[:32],  # no fingerprint
        b"\x00\x01" + REQUEST[2:4] + b"\x00\x00\x00\x00" + REQUEST[8:],  # no cookie
        b"\x01\x01" + REQUEST[2:],  # not a request
        b"short",
    ],
)
def test_server_ignores_anything_but_valid_tailscale_requests(packet):
    assert stun.handle_request(packet, ("127.0.0.1", 1)) is None


def test_is_stun():
    assert stun.is_stun(REQUEST) and stun.is_stun(RESPONSE)
    assert not stun.is_stun(b"\x80" + REQUEST[1:])
    assert not stun.is_stun(REQUEST[:19])


async def test_stun_server_over_udp_loopback():
    server = DerpServer()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_stun, "127.0.0.1", 0)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(b"garbage that is not stun", ("127.0.0.1", port))
            await sock.sendto(REQUEST, ("127.0.0.1", port))
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(2048)
            assert data == stun.build_response(TXID, sock.getsockname())
        assert server.stats()["stun"] == {"requests": 1, "ignored": 1}
        nursery.cancel_scope.cancel()
