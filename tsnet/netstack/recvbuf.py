"""The in-order receive buffer of a TCP connection.

Bulk data arrives as ~1240-byte payloads of decrypted packets. Appending each one to a single
growing ``bytearray`` copied it once, and every reallocation of that buffer (it holds up to the
whole receive window, megabytes) copied everything queued again, into freshly faulted pages.
This buffer instead keeps a queue of chunks: a payload that is a view of an immutable ``bytes``
packet is kept as that view (no copy); the application's read joins what it takes, once.

Small payloads are copied and merged into a ``bytearray`` tail chunk, so a peer sending tiny
segments cannot make us hold one chunk object (and one whole packet) per byte: the overhead per
buffered byte stays bounded.

The queue is a plain list read from a moving head index (compacted as the head advances): an
idle connection's empty list costs 56 bytes where a ``deque`` costs 760.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]

#: Payloads shorter than this are copied into a merged tail chunk rather than kept as views.
SMALL_PAYLOAD = 512
#: A merged tail chunk takes small payloads until it holds this many bytes.
MERGE_LIMIT = 16 * 1024
#: Consumed slots at the front are dropped once there are this many (and they are half the list).
_COMPACT_AT = 64


class ReceiveBuffer:
    """A FIFO of received bytes; ``len()`` is the number of bytes queued."""

    __slots__ = ("_chunks", "_head", "_size")

    def __init__(self) -> None:
        # Chunks before _head were consumed (their slots hold None until compaction).
        self._chunks: list[bytes | bytearray | memoryview | None] = []
        self._head = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``. Views of ``bytes`` (immutable) are kept as they are; anything else is copied."""
        n = len(data)
        if not n:
            return
        cls = data.__class__
        chunks = self._chunks
        if n >= SMALL_PAYLOAD and (cls is bytes or (cls is memoryview and data.obj.__class__ is bytes)):  # type: ignore[union-attr]
            chunks.append(data)
        elif n >= MERGE_LIMIT:
            chunks.append(bytes(data))
        else:
            tail = chunks[-1] if len(chunks) > self._head else None
            if tail.__class__ is bytearray and len(tail) < MERGE_LIMIT:  # type: ignore[arg-type]
                tail += data  # type: ignore[operator]
            else:
                chunks.append(bytearray(data))
        self._size += n

    def take(self, max_bytes: int) -> bytes:
        """Remove and return up to ``max_bytes`` from the front."""
        size = self._size
        if max_bytes <= 0 or not size:
            return b""
        chunks = self._chunks
        head = self._head
        if max_bytes >= size:
            data = b"".join(chunks[head:] if head else chunks)  # type: ignore[arg-type]
            chunks.clear()
            self._head = 0
            self._size = 0
            return data
        out = []
        need = max_bytes
        while need:
            chunk = chunks[head]
            n = len(chunk)  # type: ignore[arg-type]
            if n <= need:
                out.append(chunk)
                chunks[head] = None  # release it now, not at compaction
                head += 1
                need -= n
            elif chunk.__class__ is bytearray:
                out.append(chunk[:need])  # type: ignore[index]
                del chunk[:need]  # type: ignore[union-attr]
                need = 0
            else:
                view = memoryview(chunk) if chunk.__class__ is bytes else chunk
                out.append(view[:need])  # type: ignore[index]
                chunks[head] = view[need:]  # type: ignore[index]
                need = 0
        if head >= _COMPACT_AT and 2 * head >= len(chunks):
            del chunks[:head]
            head = 0
        self._head = head
        self._size = size - max_bytes
        return b"".join(out)  # type: ignore[arg-type]

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._size = 0
