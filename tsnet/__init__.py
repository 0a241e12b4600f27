"""tsnet: give a Python program its own node on a Tailscale-compatible network."""

__version__ = "0.1.0.dev0"
