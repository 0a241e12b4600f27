"""ReceiveBuffer: a chunk queue that keeps views of immutable packets and copies everything else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tsnet.netstack.recvbuf import MERGE_LIMIT, SMALL_PAYLOAD, ReceiveBuffer


def test_views_of_bytes_are_kept_without_copy() -> None:
    packet = bytes(range(256)) * 6
    view = memoryview(packet)[40:]
    buf = ReceiveBuffer()
    buf.append(view)
    assert buf._chunks[0] is view and len(buf) == len(packet) - 40
    assert buf.take(10) == packet[40:50]
    assert buf.take(10_000) == packet[50:] and len(buf) == 0 and not buf


def test_mutable_input_is_copied() -> None:
    data = bytearray(b"x" * 2000)
    buf = ReceiveBuffer()
    buf.append(memoryview(data))
    buf.append(data)
    data[:] = b"y" * 2000  # the caller reuses its buffer
    assert buf.take(4000) == b"x" * 4000


def test_small_payloads_merge_into_bounded_tail_chunks() -> None:
    buf = ReceiveBuffer()
    for _ in range(10_000):
        buf.append(memoryview(b"z"))  # a peer sending 1-byte segments
    assert len(buf) == 10_000
    assert len(buf._chunks) <= 10_000 // MERGE_LIMIT + 1
    assert buf.take(3) == b"zzz" and len(buf) == 9_997


@given(st.lists(st.tuples(st.sampled_from(["bytes", "view", "bytearray"]), st.integers(0, 3 * SMALL_PAYLOAD)),
                max_size=30),
       st.lists(st.integers(0, 4000), max_size=30))
def test_take_returns_the_bytes_in_order(appends, takes) -> None:
    buf = ReceiveBuffer()
    expected = bytearray()
    counter = 0
    for kind, n in appends:
        chunk = bytes((counter + i) % 251 for i in range(n))
        counter += n
        expected += chunk
        buf.append(chunk if kind == "bytes" else memoryview(chunk)[0:] if kind == "view" else bytearray(chunk))
    got = bytearray()
    for t in takes:
        got += buf.take(t)
        assert len(buf) == len(expected) - len(got)
    got += buf.take(len(buf))
    assert got == expected and len(buf) == 0


def test_consumed_chunks_are_released_and_the_list_compacted() -> None:
    buf = ReceiveBuffer()
    packets = [bytes([i % 251]) * 1000 for i in range(500)]
    for p in packets:
        buf.append(memoryview(p))
    got = bytearray()
    while len(buf) > 1000:
        got += buf.take(1000)
        assert all(c is None for c in buf._chunks[:buf._head])  # consumed: no packet kept alive
        assert buf._head < 64 or 2 * buf._head < len(buf._chunks)  # compacted as it goes
    got += buf.take(10_000)
    assert got == b"".join(packets) and len(buf._chunks) == 0
