"""State directory and admin CLI: file modes, schema version, persistent Noise key, authkey/nodes commands."""

import datetime as dt
import json
import stat

import pytest

from tsnet.cli import main
from tsnet.control.cli import parse_duration
from tsnet.control.store import SCHEMA_VERSION, Store, StoreError

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_state_files_private_and_key_persistent(tmp_path):
    d = tmp_path / "st"
    s = Store.open(d)
    key = s.noise_key()
    s.create_authkey(NOW)
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    s2 = Store.open(d)
    assert s2.noise_key() == key
    assert s2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_refused(tmp_path):
    s = Store.open(tmp_path / "st")
    s.db.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    s.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(tmp_path / "st")


def test_address_allocation_unique_and_reused_after_delete(tmp_path):
    s = Store.open(tmp_path / "st")
    nodes = [s.create_node(NOW, machine_key=f"m{i}", node_key=f"k{i}", name="host", user_id=1, ephemeral=False,
                           tags=(), key_expiry=None, hostinfo=None, authkey_id=None) for i in range(300)]
    assert len({n.ipv4 for n in nodes}) == 300 and len({n.ipv6 for n in nodes}) == 300
    assert [n.name for n in nodes[:3]] == ["host", "host-1", "host-2"]
    assert all(not n.ipv4.endswith((".0", ".255")) for n in nodes)
    assert nodes[0].ipv4 == "100.64.0.1" and nodes[0].ipv6 == "fd7a:115c:a1e0::1"
    s.delete_node(nodes[5].id)
    again = s.create_node(NOW, machine_key="mx", node_key="kx", name="x", user_id=1, ephemeral=False, tags=(),
                          key_expiry=None, hostinfo=None, authkey_id=None)
    assert again.ipv4 == nodes[5].ipv4
    s.delete_node(again.id)
    last = s.create_node(NOW, machine_key="my", node_key="ky", name="y", user_id=1, ephemeral=False, tags=(),
                         key_expiry=None, hostinfo=None, authkey_id=None)
    assert last.id > again.id  # node IDs are never reused


def test_durations():
    assert parse_duration("24h") == dt.timedelta(hours=24)
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    with pytest.raises(Exception):
        parse_duration("soon")


def test_cli_authkey_and_nodes(tmp_path, capsys):
    d = str(tmp_path / "st")
    assert main(["control", "authkey", "create", "--state-dir", d, "--reusable", "--ephemeral", "--tags", "tag:a,tag:b",
                 "--expiry", "1h"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("tskey-auth-") and "--TL" not in key
    assert main(["control", "authkey", "list", "--state-dir", d, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["key"] == key and row["reusable"] and row["ephemeral"] and row["tags"] == ["tag:a", "tag:b"]
    assert row["state"] == "valid"
    assert main(["control", "authkey", "revoke", "--state-dir", d, key]) == 0
    main(["control", "authkey", "list", "--state-dir", d, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["state"] == "auth key revoked"
    assert main(["control", "authkey", "revoke", "--state-dir", d, "tskey-auth-none"]) == 1
    assert main(["control", "authkey", "create", "--state-dir", d, "--tags", "nottag"]) == 2

    s = Store.open(d)
    s.create_node(NOW, machine_key="m", node_key="k", name="web", user_id=1, ephemeral=False, tags=(),
                  key_expiry=None, hostinfo=None, authkey_id=None)
    s.close()
    capsys.readouterr()
    assert main(["control", "nodes", "list", "--state-dir", d, "--json"]) == 0
    (n,) = json.loads(capsys.readouterr().out)
    assert n["name"] == "web" and n["addresses"] == ["100.64.0.1", "fd7a:115c:a1e0::1"] and not n["expired"]
    assert main(["control", "nodes", "rename", "--state-dir", d, "web", "Bad Name"]) == 2
    assert main(["control", "nodes", "rename", "--state-dir", d, "web", "www"]) == 0
    assert main(["control", "nodes", "rename", "--state-dir", d, "www", "web"]) == 0
    assert main(["control", "nodes", "expire", "--state-dir", d, "web"]) == 0
    main(["control", "nodes", "list", "--state-dir", d, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["expired"]
    assert main(["control", "nodes", "delete", "--state-dir", d, "web.tailnet.test"]) == 0
    main(["control", "nodes", "list", "--state-dir", d, "--json"])
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit):
        main(["control", "nodes", "delete", "--state-dir", d, "ghost"])


def test_serve_refuses_bad_policy_with_line(tmp_path, capsys):
    bad = tmp_path / "policy.hujson"
    bad.write_text('{\n  // comment\n  "acls": [\n    {"action": "accept", "src": ["group:ghost"], "dst": ["*:*"]},\n  ],\n}\n')
    assert main(["control", "serve", "--state-dir", str(tmp_path / "st"), "--policy", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 4:" in err and "group:ghost" in err


async def test_netmap_command_against_loopback_server(control, tmp_path):
    import sys
    from pathlib import Path

    import trio

    repo = Path(__file__).resolve().parents[2]
    state = tmp_path / "py.json"
    cmd = [sys.executable, "-m", "tsnet", "control", "netmap", "--login-server", control.url,
           "--authkey", control.authkey(), "--hostname", "cli-node", "--state", str(state), "--json"]
    with trio.fail_after(30):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, cwd=repo, check=False)
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["self"]["name"] == "cli-node.tailnet.test." and summary["peers"] == []
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # Second run: same keys from --state, no auth key needed.
    cmd2 = [c for c in cmd if c != cmd[cmd.index("--authkey") + 1] and c != "--authkey"]
    with trio.fail_after(30):
        again = await trio.run_process(cmd2, capture_stdout=True, capture_stderr=True, cwd=repo, check=False)
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(again.stdout)["self"] == summary["self"]


async def test_serve_subprocess_with_derp_map_file(tmp_path):
    """`tsnet control serve` end to end on loopback: a user-given DERP map reaches a client."""
    import subprocess
    import sys
    from pathlib import Path

    import trio

    from control_helpers import NetmapWatcher
    from tsnet.control.client import ClientConfig, ControlClient
    from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate

    repo = Path(__file__).resolve().parents[2]
    derp_map = tmp_path / "derp.json"
    derp_map.write_text(json.dumps({"Regions": {"7": {"RegionID": 7, "RegionCode": "own", "RegionName": "Own",
                                                      "Nodes": [{"Name": "7a", "RegionID": 7, "HostName": "derp.example"}]}}}))
    state = tmp_path / "st"
    admin = Store.open(state)
    key = admin.create_authkey(NOW, reusable=True).key
    admin.close()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tsnet", "control", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state),
         "--derp-map", str(derp_map)], cwd=repo, stderr=subprocess.PIPE)
    try:
        buf = b""
        with trio.fail_after(20):
            while b"serving http://" not in buf:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, buf.decode()
                buf += chunk
        url = buf.split(b"serving ", 1)[1].split(b" ", 1)[0].decode()
        watcher = NetmapWatcher()
        cfg = ClientConfig(control_url=url, machine_key=MachinePrivate.generate(), node_key=NodePrivate.generate(),
                           disco_key=DiscoPrivate.generate().public, hostname="sub", auth_key=key)
        async with ControlClient(cfg) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run, watcher)
                nm = await watcher.wait_for(lambda nm: True)
                nursery.cancel_scope.cancel()
        assert list(nm.derp_map.regions) == [7] and nm.derp_map.regions[7].nodes[0].host_name == "derp.example"
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
