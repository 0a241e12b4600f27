"""magicsock: one UDP socket multiplexing WireGuard, disco, STUN and peer-relay traffic."""
