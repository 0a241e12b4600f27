"""A userspace IPv4/IPv6 stack with ICMP, UDP and TCP, as a sans-IO core plus trio sockets.

Layers (each module small, each core sans-IO):

* ``checksum``, ``ip``, ``tcp_wire``: wire formats.
* ``tcp.TCPConnection``: one TCP connection (state machine, SACK, CUBIC/Reno, timers).
* ``stack.Stack``: sans-IO host. Takes IP packets with ``now``; answers ICMP echo, sends
  RST / ICMP port-unreachable for closed ports, reassembles fragments, demultiplexes to
  TCP connections, listeners (bounded SYN and accept queues) and UDP endpoints; one
  timer for all of them. ``packets_to_send()`` returns whole IP packets.
* ``sockets.NetStack``: the trio driver. ``deliver(packets)`` feeds packets from
  WireGuard/magicsock synchronously (no task switch per packet) and hands output to
  the ``send_packets`` callable it was given; it wakes only the tasks whose sockets changed.
* ``static``: low-level static-peer mode (the stack over ``tsnet.wg`` with one fixed peer,
  no control plane), used by tests and benchmarks.

The trio API (used by ``tsnet.Server``, the proxies and MagicDNS)::

    net = NetStack(Stack([our_v4, our_v6], now=trio.current_time()), send_packets)
    nursery.start_soon(net.run)                 # timers
    net.deliver(list_of_ip_packets)             # from WireGuard / magicsock
    stream = await net.open_tcp_stream("100.64.0.2", 80, timeout=10)   # TCPStream
    listener = await net.open_tcp_listener(8080)                         # TCPListener
    udp = await net.open_udp_socket(port=5353)                           # UDPSocket

``TCPStream`` is a ``trio.abc.HalfCloseableStream``, ``TCPListener`` a
``trio.abc.Listener[TCPStream]``. Failures are the builtin OSError subclasses with errno
set: ConnectionRefusedError, ConnectionResetError, TimeoutError.
"""
