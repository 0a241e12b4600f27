"""tsnet.Server lifecycle against the in-process control server: up, status, close, errors, stores."""

from __future__ import annotations

import ipaddress

import pytest
import trio

import tsnet
from tests.server_helpers import start_tailnet


@pytest.fixture
async def tailnet(nursery, tmp_path):
    return await start_tailnet(nursery, tmp_path)


async def test_up_status_close(tailnet):
    srv = tailnet.node("alpha")
    st = await srv.up(timeout=10)
    assert st.backend_state == "Running"
    ips = srv.tailscale_ips()
    assert ips[0].version == 4 and ipaddress.ip_address(ips[0]) in ipaddress.ip_network("100.64.0.0/10")
    assert st.self_node is not None and st.self_node.name == "alpha"
    assert st.magic_dns_suffix == "tailnet.test"
    assert st.as_dict()["self_node"]["addresses"][0] == str(ips[0])
    await srv.close()
    await srv.close()  # idempotent
    assert srv.status().backend_state == "Stopped"
    assert srv.tailscale_ips() == []
