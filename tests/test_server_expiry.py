"""A peer whose node key expired: listed in status as expired, its name still resolves, no traffic."""

from __future__ import annotations

import errno

import pytest

from tests.server_helpers import start_tailnet, wait_for


async def test_expired_peer_is_shown_expired_resolves_and_is_unreachable(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    a = tailnet.node("a")
    # b's key is single use: once its node key expires it cannot log in again on its own.
    b = tailnet.node("b", auth_key=tailnet.authkey(ephemeral=True, reusable=False))
    await a.up(timeout=10)
    await b.up(timeout=10)
    await a.wait_for_peer("b", timeout=10)
    b_ip = b.tailscale_ips()[0]
    listener = await b.listen("tcp", ":80")
    assert a.status().peer("b").expired is False

    record = tailnet.server.store.node_by_name("b")
    assert record is not None
    tailnet.server.expire_node(record.id)

    await wait_for(lambda: (p := a.status().peer("b")) is not None and p.expired, what="a sees b expired")
    peer = a.status().peer("b")
    assert peer.path == "expired" and peer.addresses[0] == b_ip
    assert a.status().as_dict()["peers"][0]["expired"] is True
    assert b_ip in await a.resolve("b")  # the name still resolves
    with pytest.raises(OSError) as info:  # no route to an expired peer, at once
        await a.dial("tcp", f"{b_ip}:80", timeout=5)
    assert info.value.errno == errno.EHOSTUNREACH
    await wait_for(lambda: any("expired" in w for w in b.status().health), what="b warns its key expired")
    await listener.aclose()
