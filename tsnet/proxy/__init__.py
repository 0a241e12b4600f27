"""SOCKS5 and HTTP proxies on localhost that dial over the tailnet."""
