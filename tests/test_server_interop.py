"""tsnet.Server with real tailscaled 1.96.4 (lab namespaces, our control server, no route out).

Topology (from the control interop tests): ``n1 --veth-- ctl --veth-- n2``. ctl runs ``tsnet control
serve`` with a policy; tailscaled "alpha" (userspace networking, ``--socks5-server``) runs in n1; our
Python node "pynode" (a ``tsnet.Server`` in a subprocess) runs in n2.

* curl through **our** loopback proxy (SOCKS5 and HTTP) reaches a server on alpha by MagicDNS name
  (tailscaled's userspace mode hands the connection to 127.0.0.1 of its namespace).
* tailscaled's own SOCKS5 reaches a ``serve_forward`` on our node, and a port the policy allows;
  a port the policy denies is refused by our packet filter.
* The ephemeral Python node is gone from the control server right after it closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.test_control_tailscaled import (
    _tsnet,
    dump,
    fetch_via_socks,
    make_blob,
    make_tailnet,
    serve_files,
    sha256_of,
)
from tests.lab import Lab, TailscaleBinaries, wait_until

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[1]

POLICY = """{
  // alpha's web server (8000), pynode's hello (8001) and its serve_forward (8081); not 8002
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:8000,8001,8081"]}],
}
"""

NODE_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import trio, tsnet

async def main():
    info, stop = Path(os.environ["INFO_FILE"]), Path(os.environ["STOP_FILE"])
    srv = tsnet.Server(hostname="pynode", ephemeral=True)
    await srv.up(timeout=60)
    proxy = await srv.loopback()

    async def hello(stream):
        async with stream:
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello pynode")

    async with trio.open_nursery() as nursery:
        for port in (8001, 8002):
            nursery.start_soon(trio.serve_listeners, hello, [await srv.listen("tcp", f":{port}")])
        await nursery.start(srv.serve_forward, 8081, "127.0.0.1:9000")
        info.write_text(json.dumps({"ip": str(srv.tailscale_ips()[0]), "proxy": [
            proxy.host, proxy.port, proxy.credentials.username, proxy.credentials.password]}))
        while not stop.exists():
            await trio.sleep(0.05)  # the test asks us to stop by creating STOP_FILE
        print("filter", json.dumps({str(k): v for k, v in srv._filter.drops.items() if v}),
              "rejects", srv._filter.rejects, flush=True)
        await srv.close()
        nursery.cancel_scope.cancel()
    print("closed", flush=True)

trio.run(main)
"""


def test_tsnet_server_with_tailscaled(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text(POLICY)
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, socks5=True,
                       server_args=("--policy", str(policy)))
    node_proc = None
    try:
        alpha, beta = net.nodes  # beta's tailscaled stays logged out; its namespace hosts our node
        alpha.cli("up", f"--login-server={alpha.control_url}", f"--authkey={net.authkey}", "--hostname=alpha",
                  "--timeout=60s", timeout=90)
        digest = make_blob(tmp_path / "www")
        serve_files(alpha.ns, tmp_path / "www", 8000)  # alpha's tailnet :8000 -> its 127.0.0.1:8000
        serve_files(beta.ns, tmp_path / "www", 9000)  # pynode's serve_forward target

        eph = _tsnet("control", "authkey", "create", "--state-dir", str(net.state), "--ephemeral",
                     "--reusable").strip()
        info_file, stop_file = tmp_path / "pynode.json", tmp_path / "pynode.stop"
        node_proc = beta.ns.popen([sys.executable, "-c", NODE_SCRIPT], cwd=str(REPO), env={
            "PYTHONPATH": str(REPO), "TS_CONTROL_URL": beta.control_url, "TS_AUTHKEY": eph,
            "INFO_FILE": str(info_file), "STOP_FILE": str(stop_file)})
        wait_until(lambda: info_file.exists() or node_proc.poll() is not None, 60, "pynode up")
        assert node_proc.poll() is None, node_proc.log()
        info = json.loads(info_file.read_text())
        host, port, user, password = info["proxy"]
        wait_until(lambda: "pynode" in alpha.peer_names(), 30, "alpha sees pynode")

        # 1. curl through OUR proxy (in n2) to alpha's server, by MagicDNS name: SOCKS5 and HTTP proxy.
        out = tmp_path / "got.bin"
        for args in (["--socks5-hostname", f"{host}:{port}"], ["-x", f"http://{host}:{port}"]):
            out.unlink(missing_ok=True)
            cmd = beta.ns.exec_args(["curl", "-sS", "--fail", "-m", "60", *args, "--proxy-user", f"{user}:{password}",
                                     "-o", str(out), "http://alpha.tailnet.test:8000/blob.bin"])
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
            assert res.returncode == 0, f"{args}: {res.stderr}\n{node_proc.log()[-3000:]}"
            assert sha256_of(out) == digest

        # 2. tailscaled's SOCKS5 (in n1) reaches our serve_forward, and the allowed port.
        res = fetch_via_socks(alpha, "http://pynode:8081/blob.bin", out, timeout=60)
        assert res.returncode == 0, res.stderr
        assert sha256_of(out) == digest
        res = fetch_via_socks(alpha, f"http://{info['ip']}:8001/", out, timeout=20)
        assert res.returncode == 0 and out.read_bytes() == b"hello pynode", res.stderr
        # 3. The denied port: our filter drops the SYN (and sends a TSMP reject).
        res = fetch_via_socks(alpha, f"http://{info['ip']}:8002/", out, timeout=5)
        assert res.returncode != 0, "port 8002 must be blocked by the policy"

        # 4. Close: the ephemeral node logs out and is gone from the control server at once.
        stop_file.write_text("stop")
        wait_until(lambda: node_proc.poll() is not None, 20, "pynode exits")
        log = node_proc.log()
        assert "closed" in log, log[-3000:]
        assert '"no-rule"' in log or "no_rule" in log.lower(), log[-3000:]
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        assert "pynode" not in [n["name"] for n in listed]
    finally:
        if node_proc is not None:
            print(f"--- pynode ---\n{node_proc.log()[-4000:]}")
        dump(net)
