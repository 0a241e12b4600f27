import base64

import pytest
from hypothesis import given, settings, strategies as st

from tsnet.control.noise import (
    HandshakeError,
    Initiator,
    MAX_RECORD_LEN,
    NoiseError,
    error_record,
    respond,
)
from tsnet.key import MachinePrivate, MachinePublic

# The fixed vector from the protocol notes (section 4.5).
SERVER_PRIV = "a8f3ed34c441df05e689aebe15402d16b46fe96316862826d2ffd513369fcd4a"
SERVER_PUB = "de9cd0c19f8f38993508153f51a82726de935bfb06b64918c3e4badbbd19bb10"
MACHINE_PRIV = "f05d8777ec24f1286d731376a6413d5b8802abfb7d84c78fdbd774bd564fd762"
MACHINE_PUB = "cd7487f7e71297fd364ae18032d54a6ea7510ba38dc26616dfdae729179a686d"
CLIENT_EPH = "30939c5adddec942290b637530898a70f2d32453e5241f30a0550780e7586b47"
SERVER_EPH = "58e551a192e32372d3dfca3025e3a6129aa00350e5ffceeb0184f61b25e23441"
INIT = (
    "0085010060f01e3feed2953d4221feddad1b6baa06ee321666eb0e170d33428905b0057d4e"
    "0b45cb4068461826ac02e2f3166d862c7565d487a972408835bc26aa1d765c6211b720c70a"
    "69b5ff904eb9cb10635aef4f3b6438cce324b80bc5ef3682f02e0b"
)
RESP = "02003098ce40bd9d69d7950579450cfcb9844f328d214b045f825a96bf70f9ae37b37d9c8d06fb6f2bf80e76f62652c8917120"
HHASH = "acb96e237f6d8fcc608570b750d4420d3d4599bce90409bbc41ca89d15c6ac5c"
REC0 = "040015cf797113c61380630edb2a463f2b9173e8e8a81465"
REC1 = "0400157515f0ea419d1ec1001b4e289fe9f645b86f6a8a72"
HEADER = (
    "AIUBAGDwHj/u0pU9QiH+3a0ba6oG7jIWZusOFw0zQokFsAV9TgtFy0BoRhgmrALi8xZthix1"
    "ZdSHqXJAiDW8JqoddlxiEbcgxwpptf+QTrnLEGNa7087ZDjM4yS4C8XvNoLwLgs="
)


def _priv(h):
    return MachinePrivate(bytes.fromhex(h))


def vector_pair():
    server = _priv(SERVER_PRIV)
    machine = _priv(MACHINE_PRIV)
    init = Initiator(machine, server.public, 133, ephemeral=_priv(CLIENT_EPH))
    responded = respond(server, init.initiation, ephemeral=_priv(SERVER_EPH))
    client = init.finish(responded.response)
    return init, responded, client


def test_vector_keys():
    assert _priv(SERVER_PRIV).public.hex() == SERVER_PUB
    assert _priv(MACHINE_PRIV).public.hex() == MACHINE_PUB


def test_vector_handshake_bytes():
    init, responded, client = vector_pair()
    assert init.initiation.hex() == INIT
    assert base64.b64encode(init.initiation).decode() == HEADER
    assert responded.response.hex() == RESP
    assert responded.version == 133
    assert responded.peer == MachinePublic(bytes.fromhex(MACHINE_PUB))
    assert client.handshake_hash.hex() == HHASH
    assert responded.transport.handshake_hash.hex() == HHASH


def test_vector_records_big_endian_nonce():
    _, responded, client = vector_pair()
    assert client.seal(b"hello").hex() == REC0
    assert client.seal(b"hello").hex() == REC1
    server = responded.transport
    assert server.receive(bytes.fromhex(REC0 + REC1)) == b"hellohello"


def pair():
    server_key = MachinePrivate.generate()
    machine = MachinePrivate.generate()
    init = Initiator(machine, server_key.public, 133)
    responded = respond(server_key, init.initiation)
    return init.finish(responded.response), responded.transport


def test_large_write_splits_into_records():
    c, s = pair()
    data = bytes(range(256)) * 100  # 25600 bytes
    wire = c.seal(data)
    # walk the records: each at most 4096 bytes
    pos, n = 0, 0
    while pos < len(wire):
        assert wire[pos] == 4
        length = int.from_bytes(wire[pos + 1 : pos + 3], "big")
        assert length + 3 <= MAX_RECORD_LEN
        pos += 3 + length
        n += 1
    assert n == 7
    # byte-at-a-time delivery
    got = bytearray()
    for i in range(len(wire)):
        got += s.receive(wire[i : i + 1])
    assert bytes(got) == data
    assert s.pending == 0


def test_both_directions_and_empty_record():
    c, s = pair()
    for i in range(5):
        assert s.receive(c.seal(b"ping%d" % i)) == b"ping%d" % i
        assert c.receive(s.seal(b"pong%d" % i)) == b"pong%d" % i
    assert s.receive(c.seal(b"")) == b""


def test_flipped_bit_is_fatal():
    c, s = pair()
    rec = bytearray(c.seal(b"secret"))
    rec[-1] ^= 1
    with pytest.raises(NoiseError):
        s.receive(bytes(rec))
    with pytest.raises(NoiseError):
        s.receive(b"")  # stays broken


def test_oversize_and_wrong_type_records_refused():
    c, s = pair()
    with pytest.raises(NoiseError):
        s.receive(b"\x04\x10\x00")  # 4096 + 3 > 4096
    c, s = pair()
    with pytest.raises(NoiseError):
        s.receive(b"\x02\x00\x10" + bytes(16))


def test_replayed_record_fails():
    c, s = pair()
    rec = c.seal(b"x")
    assert s.receive(rec) == b"x"
    with pytest.raises(NoiseError):
        s.receive(rec)


def test_wrong_server_key_fails_handshake():
    server_key = MachinePrivate.generate()
    init = Initiator(MachinePrivate.generate(), MachinePrivate.generate().public, 133)
    with pytest.raises(HandshakeError):
        respond(server_key, init.initiation)


def test_responder_uses_client_version():
    server_key = MachinePrivate.generate()
    init = Initiator(MachinePrivate.generate(), server_key.public, 42)
    r = respond(server_key, init.initiation)
    assert r.version == 42
    c = init.finish(r.response)
    assert r.transport.receive(c.seal(b"v42")) == b"v42"


def test_bad_initiation_lengths():
    server_key = MachinePrivate.generate()
    init = Initiator(MachinePrivate.generate(), server_key.public, 133).initiation
    with pytest.raises(HandshakeError):
        respond(server_key, init[:-1])
    bad = bytearray(init)
    bad[2] = 2
    with pytest.raises(HandshakeError):
        respond(server_key, bytes(bad))


def test_error_record_reported_by_initiator():
    init = Initiator(MachinePrivate.generate(), MachinePrivate.generate().public, 133)
    with pytest.raises(HandshakeError, match="server error: 'nope'"):
        init.finish(error_record("nope"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=9000), max_size=6), st.integers(min_value=1, max_value=5000))
def test_any_chunking_round_trips(messages, chunk):
    c, s = pair()
    wire = b"".join(c.seal(m) for m in messages)
    got = bytearray()
    for i in range(0, len(wire), chunk):
        got += s.receive(wire[i : i + chunk])
    assert bytes(got) == b"".join(messages)
