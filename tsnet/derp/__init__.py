"""DERP: the relay of last resort (frame codec, server, client) and STUN."""
