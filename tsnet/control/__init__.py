"""The control plane: ts2021 transport, client, and an embedded coordination server.

Layers, bottom up (each usable on its own):

* :mod:`.noise` - controlbase, Tailscale's Noise IK handshake and big-endian-nonce records (sans-IO).
* :mod:`.controlhttp` - the HTTP/1.1 upgrade to ``tailscale-control-protocol`` and the early payload.
* :mod:`.conn` - trio driver: :class:`~.conn.NoiseStream`, ``dial`` (client) and ``accept`` (server).
* :mod:`.h2conn` - HTTP/2 with prior knowledge over any trio stream, client and server, concurrent streams.
* :mod:`.tailcfg` - control messages as dataclasses with tailcfg's exact JSON names.
* :mod:`.netmap` - client map session (frame decoding, delta application) and :class:`~.netmap.NetworkMap`.
* :mod:`.client` - :class:`~.client.ControlClient`: /key, register (auth key, AuthURL), map long-poll, logout.
* :mod:`.store`, :mod:`.policy`, :mod:`.server` - the coordination server (SQLite state, HuJSON policy).
* :mod:`.cli` - ``tsnet control serve | authkey | nodes | netmap``.

Typical client use::

    from tsnet.control.client import ClientConfig, ControlClient

    async with ControlClient(ClientConfig(control_url=..., machine_key=..., node_key=...,
                                          disco_key=..., hostname="web", auth_key=key)) as client:
        await client.run(on_netmap)   # on_netmap(NetworkMap) after every change
"""
