"""The in-order receive buffer of a TCP connection.

Bulk data arrives as ~1240-byte payloads of decrypted packets. Appending each one to a single
growing ``bytearray`` copied it once, and every reallocation of that buffer (it holds up to the
whole receive window, megabytes) copied everything queued again, into freshly faulted pages.
This buffer instead keeps a queue of chunks: a payload that is a view of an immutable ``bytes``
packet is kept as that view (no copy); the application's read joins what it takes, once.

Small payloads are copied and merged into a ``bytearray`` tail chunk, so a peer sending tiny
segments cannot make us hold one chunk object (and one whole packet) per byte: the overhead per
buffered byte stays bounded.
"""

from __future__ import annotations

from collections import deque

__all__ = ["ReceiveBuffer"]

#: Payloads shorter than this are copied into a merged tail chunk rather than kept as views.
SMALL_PAYLOAD = 512
#: A merged tail chunk takes small payloads until it holds this many bytes.
MERGE_LIMIT = 16 * 1024


class ReceiveBuffer:
    """A FIFO of received bytes; ``len()`` is the number of bytes queued."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes | bytearray | memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``. Views of ``bytes`` (immutable) are kept as they are; anything else is copied."""
        n = len(data)
        if not n:
            return
        cls = data.__class__
        if n >= SMALL_PAYLOAD and (cls is bytes or (cls is memoryview and data.obj.__class__ is bytes)):  # type: ignore[union-attr]
            self._chunks.append(data)
        elif n >= MERGE_LIMIT:
            self._chunks.append(bytes(data))
        else:
            chunks = self._chunks
            tail = chunks[-1] if chunks else None
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
        if max_bytes >= size:
            data = b"".join(chunks)
            chunks.clear()
            self._size = 0
            return data
        out = []
        need = max_bytes
        while need:
            chunk = chunks[0]
            n = len(chunk)
            if n <= need:
                out.append(chunk)
                chunks.popleft()
                need -= n
            elif chunk.__class__ is bytearray:
                out.append(chunk[:need])
                del chunk[:need]  # type: ignore[union-attr]
                need = 0
            else:
                view = memoryview(chunk) if chunk.__class__ is bytes else chunk
                out.append(view[:need])
                chunks[0] = view[need:]
                need = 0
        self._size = size - max_bytes
        return b"".join(out)

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
