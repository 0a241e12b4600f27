"""Audit of controlbase (Noise), the early payload and our server's expired-peer encoding.

Each test names the rule it checks against Tailscale's implementation.
"""

import datetime as dt
import json
import struct
import tempfile

import pytest

from tsnet.control import controlhttp, tailcfg
from tsnet.control.netmap import MapSession
from tsnet.control.noise import MAX_PLAINTEXT_LEN, Initiator, NoiseError, respond
from tsnet.control.server import ControlServer, ServerConfig, _Session
from tsnet.control.store import Store
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate

T0 = dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)


def _pair():
    server, client = MachinePrivate.generate(), MachinePrivate.generate()
    init = Initiator(client, server.public, 133)
    done = respond(server, init.initiation)
    return init.finish(done.response), done.transport


def test_send_nonce_exhaustion_is_an_error_not_a_wrap():
    # Rule (controlbase): the all-ones nonce is never used; there is no rekey, the connection ends.
    c, _ = _pair()
    c._send_n = 2**64 - 2
    c.seal(b"last")  # nonce 2^64-2, the final usable one
    with pytest.raises(NoiseError, match="nonce exhausted"):
        c.seal(b"one too many")
    with pytest.raises(NoiseError, match="broken"):
        c.seal(b"")


def test_receive_nonce_exhaustion_is_an_error():
    c, s = _pair()
    record = c.seal(b"x")
    s._recv_n = 2**64 - 1
    with pytest.raises(NoiseError, match="nonce exhausted"):
        s.receive(record)
    with pytest.raises(NoiseError, match="broken"):
        s.receive(b"")


def test_largest_plaintext_is_one_record_of_4096_bytes():
    # Rule: maxMessageSize 4096 = 3-byte header + ciphertext; plaintext at most 4096 - 3 - 16.
    c, s = _pair()
    wire = c.seal(b"a" * MAX_PLAINTEXT_LEN)
    assert len(wire) == 4096 and s.receive(wire) == b"a" * MAX_PLAINTEXT_LEN
    assert len(c.seal(b"a" * (MAX_PLAINTEXT_LEN + 1))) == 4096 + 3 + 1 + 16


def test_responder_accepts_any_client_version_and_mixes_it_into_the_prologue():
    # Rule (controlbase.Server): no version check at this layer; the client's version is the prologue's.
    server, client = MachinePrivate.generate(), MachinePrivate.generate()
    for version in (1, 39, 133, 0xFFFF):
        init = Initiator(client, server.public, version)
        done = respond(server, init.initiation)
        assert done.version == version
        c = init.finish(done.response)
        assert done.transport.receive(c.seal(b"hi")) == b"hi"


def _early(body: bytes) -> bytes:
    return controlhttp.EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(body)) + body


def test_early_payload_malformed_or_huge_is_a_clear_error():
    # Rule (ts2021): the early payload is magic + u32 length + JSON EarlyNoise; bad JSON or an
    # absurd length ends the dial with an error, never a crash or an unbounded buffer.
    sniffer = controlhttp.EarlyPayloadSniffer()
    with pytest.raises(controlhttp.UpgradeError, match="bad early payload"):
        sniffer.feed(_early(b"{nope"))
    sniffer = controlhttp.EarlyPayloadSniffer()
    with pytest.raises(controlhttp.UpgradeError, match="too large"):
        sniffer.feed(controlhttp.EARLY_PAYLOAD_MAGIC + struct.pack(">I", 0xFFFFFFFF))
    sniffer = controlhttp.EarlyPayloadSniffer()
    sniffer.feed(_early(json.dumps({"NodeKeyChallenge": "chalpub:" + "00" * 32}).encode()) + b"h2")
    assert sniffer.done and sniffer.early.node_key_challenge.startswith("chalpub:") and sniffer.rest == b"h2"


def test_server_sends_expired_peers_unreachable():
    # Rule (Tailscale control, see ipnlocal/expiry.go): an expired peer is sent with Expired,
    # no Endpoints, no DERP home and a key whose first bytes are replaced ([bad01]); our client
    # then keeps it out of the data plane.
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            now = [T0]
            server = ControlServer(store, ServerConfig(clock=lambda: now[0]))
            user = store.ensure_user("u@x", "u", T0)
            ids = []
            for name in ("watcher", "peer"):
                n = store.create_node(T0, machine_key=str(MachinePrivate.generate().public),
                                      node_key=str(NodePrivate.generate().public), name=name, user_id=user.id,
                                      ephemeral=False, tags=(), key_expiry=T0 + dt.timedelta(hours=1),
                                      hostinfo={"Hostname": name}, authkey_id=None)
                store.update_node(n.id, disco_key=str(DiscoPrivate.generate().public), endpoints=("192.0.2.1:1",),
                                  home_derp=900, cap=133)
                ids.append(n.id)
            watcher, peer = ids
            session = server.sessions[watcher] = _Session(watcher)
            client = MapSession()
            first = server._session_delta(session, first=True)
            nm = client.apply(tailcfg.decode(tailcfg.MapResponse, json.dumps(first)), T0)
            assert [p.id for p in nm.peers] == [peer] and nm.peers[0].endpoints

            # The peer's key expires (the watcher's own expiry is later).
            store.update_node(watcher, key_expiry=T0 + dt.timedelta(hours=5))
            now[0] = T0 + dt.timedelta(hours=2)
            server.notify()
            msg = server._session_delta(session, first=False)
            (sent,) = msg["PeersChanged"]
            assert sent["Expired"] is True and "Endpoints" not in sent and "HomeDERP" not in sent
            real = store.node(peer).node_key
            assert sent["Key"] != real and sent["Key"][len("nodekey:") + 12:] == real[len("nodekey:") + 12:]
            assert sent["Key"].startswith("nodekey:6da774d5d774")
            nm = client.apply(tailcfg.decode(tailcfg.MapResponse, json.dumps(msg)), now[0])
            assert nm.peers == () and [p.id for p in nm.skipped_peers] == [peer]
            # The watcher's own node is never sent "expired-broken" to itself.
            self_node = server._tailcfg_node(store.node(watcher), now[0], is_self=True)
            assert str(self_node.key) == store.node(watcher).node_key and self_node.endpoints
        finally:
            store.close()


@pytest.mark.parametrize("status,body,reason", [
    (401, b'{"MachineAuthorized":false}', "refused the auth key"),  # Headscale's bad-key answer
    (401, b'{"Error":"invalid key: expired"}', "invalid key: expired"),
    (403, b"forbidden: key revoked\n", "forbidden: key revoked"),
])
async def test_register_refusal_by_http_status_is_a_login_error(status, body, reason):
    # A server that refuses the auth key with 401/403 refused the login: LoginError with its reason
    # (tsnet.Server turns it into AuthKeyError), not a ControlError that reads as "unreachable".
    from tsnet.control.client import ClientConfig, ControlClient, ControlError, LoginError

    cfg = ClientConfig(control_url="http://127.0.0.1:9", machine_key=MachinePrivate.generate(),
                       node_key=NodePrivate.generate(), disco_key=DiscoPrivate.generate().public, hostname="t",
                       auth_key="tskey-auth-x")
    client = ControlClient(cfg)

    async def post(path, data, **kw):
        return status, body

    client._post = post
    with pytest.raises(LoginError, match=f"http {status}.*{reason}"):
        await client.login()

    async def server_error(path, data, **kw):
        return 500, b"oops"

    client._post = server_error
    with pytest.raises(ControlError) as info:
        await client.login()
    assert not isinstance(info.value, LoginError)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_garbage_records_only_raise_noise_error(chunks):
    # Malformed frames end the connection with NoiseError; nothing else escapes, and after the
    # first error the transport stays broken.
    _, s = _pair()
    broken = False
    for chunk in chunks:
        try:
            s.receive(chunk)
        except NoiseError:
            broken = True
        else:
            assert not broken


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_garbage_map_frames_only_raise_map_session_error(chunks, compressed):
    from tsnet.control.netmap import MapFrameDecoder, MapSessionError

    decoder = MapFrameDecoder(compressed=compressed)
    for chunk in chunks:
        try:
            decoder.feed(struct.pack("<I", len(chunk)) + chunk)
        except MapSessionError:
            return


async def test_register_lb_header_names_old_then_new_key():
    # Rule (direct.go): register carries ts-lb for OldNodeKey (if any) and then NodeKey.
    from tsnet.control.client import ClientConfig, ControlClient

    cfg = ClientConfig(control_url="http://127.0.0.1:9", machine_key=MachinePrivate.generate(),
                       node_key=NodePrivate.generate(), disco_key=DiscoPrivate.generate().public, hostname="t",
                       auth_key="tskey-auth-x")
    c = ControlClient(cfg)
    seen = []

    class Resp:
        status = 200

        async def read(self, limit):
            return b'{"MachineAuthorized":true}'

    class H2:
        async def request(self, method, path, body, headers):
            seen.append([v for k, v in headers if k == "ts-lb"])
            return Resp()

    async def fake_client():
        return H2()

    c._client = fake_client
    first = cfg.node_key.public
    await c.login()
    c.rotate_node_key()
    await c._register(c._register_request(auth=False))
    assert seen == [[str(first)], [str(first), str(cfg.node_key.public)]]
