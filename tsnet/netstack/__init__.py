"""A userspace IPv4/IPv6 stack with ICMP, UDP and TCP, as a sans-IO core plus trio sockets."""
