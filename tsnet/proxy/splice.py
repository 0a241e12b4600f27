"""Copy bytes both ways between two trio streams, propagating half-close."""

from __future__ import annotations

import trio

_CHUNK = 65536


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, cancel: trio.CancelScope) -> None:
    try:
        while True:
            data = await source.receive_some(_CHUNK)
            if not data:
                break
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        cancel.cancel()  # one side is gone: nothing more can flow either way
        return
    # EOF: pass it on if the sink can half-close, otherwise the other direction decides when we stop.
    if isinstance(sink, trio.abc.HalfCloseableStream):
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            cancel.cancel()
    else:
        cancel.cancel()


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Relay until both directions reached EOF or either side failed; then close both streams."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b, nursery.cancel_scope)
            nursery.start_soon(_copy, b, a, nursery.cancel_scope)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)
