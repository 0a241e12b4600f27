"""Tailscale Peer Relays: Geneve-framed UDP relay server and client."""
