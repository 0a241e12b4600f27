"""MagicDNS: the resolver at 100.100.100.100."""
