"""Frame codec: byte-exact examples worked out from the protocol notes, round trips, and errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.derp import frames as f
from tsnet.derp.frames import DerpProtocolError, FrameReader, decode_frame, encode_frame
from tsnet.derp.info import ClientInfo, ServerInfo, open_from, seal_to
from tsnet.key import NodePrivate

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def test_magic_bytes():
    assert f.MAGIC == bytes.fromhex("44455250f09f9491")
    assert f.DISCO_MAGIC == bytes.fromhex("5453f09f92ac")


@pytest.mark.parametrize(
    "frame, expected_hex",
    [
        (f.KeepAlive(), "0600000000"),
        (f.NotePreferred(True), "070000000101"),
        (f.NotePreferred(False), "070000000100"),
        (f.ServerKey(K1), "0100000028" + "44455250f09f9491" + K1.hex()),
        (f.SendPacket(K1, b"\xaa\xbb"), "0400000022" + K1.hex() + "aabb"),
        (f.RecvPacket(K2, b"\x01"), "0500000021" + K2.hex() + "01"),
        (f.PeerGone(K1, f.PeerGoneReason.DISCONNECTED), "0800000021" + K1.hex() + "00"),
        (f.PeerGone(K1, f.PeerGoneReason.NOT_HERE), "0800000021" + K1.hex() + "01"),
        (f.PeerPresent(K1), "0900000020" + K1.hex()),
        (
            f.PeerPresent(K1, ("127.0.0.1", 41641), f.PeerPresentFlags.REGULAR),
            "0900000033" + K1.hex() + "00000000000000000000ffff7f000001" + "a2a9" + "01",
        ),
        (f.ForwardPacket(K1, K2, b"x"), "0a00000041" + K1.hex() + K2.hex() + "78"),
        (f.WatchConns(), "1000000000"),
        (f.ClosePeer(K2), "1100000020" + K2.hex()),
        (f.Ping(b"12345678"), "1200000008" + b"12345678".hex()),
        (f.Pong(b"abcdefgh"), "1300000008" + b"abcdefgh".hex()),
        (f.Health("bad"), "1400000003626164"),
        (f.Health(""), "1400000000"),
        (f.Restarting(1000, 30000), "1500000008" + "000003e8" + "00007530"),
    ],
)
def test_byte_exact_and_round_trip(frame, expected_hex):
    wire = encode_frame(frame)
    assert wire.hex() == expected_hex
    reader = FrameReader()
    reader.feed(wire)
    ftype, payload = reader.next_frame()
    assert decode_frame(ftype, payload) == frame
    assert reader.next_frame() is None


def test_client_info_json_matches_tailscaled():
    # tailscaled 1.96.4 sends exactly this body (32 bytes -> 104-byte ClientInfo payload).
    body = ClientInfo().to_json()
    assert body == b'{"version":2,"CanAckPings":true}'
    assert len(f.encode_frame(f.ClientInfoFrame(K1, seal_to(NodePrivate.generate().raw, K2, body)))) == 5 + 104
    assert ServerInfo().to_json() == b'{"version":2}'


def test_info_json_is_lenient():
    info = ClientInfo.from_json(b'{"VERSION":2,"canackpings":true,"meshkey":"' + (b"ab" * 32) + b'","extra":1}')
    assert info.version == 2 and info.can_ack_pings and info.mesh_key == b"\xab" * 32
    assert ServerInfo.from_json(b'{"tokenbucketbytespersecond":10,"Version":2}').token_bucket_bytes_per_second == 10
    with pytest.raises(DerpProtocolError):
        ClientInfo.from_json(b"[1]")
    with pytest.raises(DerpProtocolError):
        ClientInfo.from_json(b"\xff")


def test_nacl_box_layout_and_auth():
    a, b = NodePrivate.generate(), NodePrivate.generate()
    nonce = bytes(24)
    sealed = seal_to(a.raw, b.public.raw, b"hello", nonce)
    assert sealed[:24] == nonce and len(sealed) == 24 + 16 + 5  # nonce || tag || ciphertext
    assert open_from(b.raw, a.public.raw, sealed) == b"hello"
    with pytest.raises(DerpProtocolError):
        open_from(b.raw, a.public.raw, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_peer_gone_without_reason_means_disconnected_and_present_v6():
    assert decode_frame(0x08, K1) == f.PeerGone(K1, 0)
    frame = f.PeerPresent(K1, ("2001:db8::1", 7), f.PeerPresentFlags.MESH_PEER | f.PeerPresentFlags.NOT_IDEAL)
    assert decode_frame(0x09, encode_frame(frame)[5:]) == frame


def test_unknown_frame_is_skipped_by_length():
    reader = FrameReader()
    reader.feed(bytes.fromhex("0b00000003aabbcc") + encode_frame(f.KeepAlive()))
    t, p = reader.next_frame()
    assert decode_frame(t, p) == f.UnknownFrame(0x0B, b"\xaa\xbb\xcc")
    t, p = reader.next_frame()
    assert decode_frame(t, p) == f.KeepAlive()


@pytest.mark.parametrize(
    "ftype, payload",
    [
        (0x01, b"DERP" + bytes(36)),  # wrong magic
        (0x01, f.MAGIC + bytes(31)),  # short key
        (0x04, bytes(31)),  # no room for dst key
        (0x04, bytes(32 + 65537)),  # oversized packet
        (0x07, b""),  # NotePreferred must be one byte
        (0x07, b"\x01\x01"),
        (0x08, bytes(31)),
        (0x10, b"\x00"),  # WatchConns carries nothing
        (0x11, bytes(33)),  # ClosePeer exactly one key
        (0x12, bytes(7)),
        (0x15, bytes(7)),
        (0x0A, bytes(63)),
    ],
)
def test_malformed_payloads_raise_protocol_error(ftype, payload):
    with pytest.raises(DerpProtocolError):
        decode_frame(ftype, payload)


def test_reader_rejects_oversized_header_before_buffering():
    reader = FrameReader(max_frame_len=1 << 20)
    reader.feed(b"\x05" + (1 << 20 | 1).to_bytes(4, "big"))
    with pytest.raises(DerpProtocolError, match="over the limit"):
        reader.next_frame()


def test_reader_waits_for_truncated_frame():
    wire = encode_frame(f.SendPacket(K1, b"abc"))
    reader = FrameReader()
    reader.feed(wire[:3])
    assert reader.next_frame() is None
    reader.feed(wire[3:-1])
    assert reader.next_frame() is None and reader.buffered == len(wire) - 1
    reader.feed(wire[-1:])
    t, p = reader.next_frame()
    assert decode_frame(t, p) == f.SendPacket(K1, b"abc")


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        encode_frame(f.SendPacket(bytes(31), b""))
    with pytest.raises(ValueError):
        encode_frame(f.SendPacket(K1, bytes(65537)))
    with pytest.raises(ValueError):
        encode_frame(f.Ping(b"short"))


keys = st.binary(min_size=32, max_size=32)
frames_st = st.one_of(
    st.builds(f.SendPacket, keys, st.binary(max_size=300)),
    st.builds(f.RecvPacket, keys, st.binary(max_size=300)),
    st.builds(f.ForwardPacket, keys, keys, st.binary(max_size=300)),
    st.builds(f.PeerGone, keys, st.sampled_from([0, 1])),
    st.builds(f.NotePreferred, st.booleans()),
    st.builds(f.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(f.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(f.Health, st.text(max_size=40)),
    st.builds(f.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(f.ClosePeer, keys),
    st.just(f.KeepAlive()),
    st.just(f.WatchConns()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st, max_size=8), st.integers(1, 50))
def test_stream_round_trip_any_split(frame_list, step):
    wire = b"".join(encode_frame(fr) for fr in frame_list)
    reader = FrameReader()
    out = []
    for i in range(0, len(wire), step):
        reader.feed(wire[i : i + step])
        while (item := reader.next_frame()) is not None:
            out.append(decode_frame(*item))
    assert out == frame_list
