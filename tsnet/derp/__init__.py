"""DERP: the relay of last resort (frame codec, server, client) and STUN.

Layout (sans-IO cores, trio drivers):

- ``frames``: the frame codec; ``info``: ClientInfo/ServerInfo and the NaCl box.
- ``server_core``: the whole server as a state machine; ``server``: :class:`DerpServer`,
  the trio driver (standalone listener, or ``handle_upgrade`` for embedding in
  another HTTP server), plus STUN and mesh.
- ``client_core``: one client connection as a state machine; ``client``:
  :class:`DerpClient` (one region, reconnecting) and :class:`DerpRegions` (home
  region, idle cleanup) for magicsock.
- ``stun``: binding request/response bytes; ``websocket``: DERP over WebSocket;
  ``tls``: self-signed certificates; ``derpmap``: a DERPMap pointing at our server.
"""
