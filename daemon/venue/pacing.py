"""What both kinds of session do on a timer: paced data, heartbeats; and the prices.

Only Trio time paces anything here, so a MockClock drives it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from daemon.venue.hub import Conn, Hub

__all__ = ["quote_prices", "send_heartbeats", "stream_data"]


async def stream_data(hub: Hub, conn: Conn, emit: Callable[[int], Awaitable[None]]) -> None:
    """Call ``emit(n)`` to send the next ``n`` data messages: paced, or in batches.

    Paced at ``rate``: message k goes out at start + k/rate (no drift); after a silent
    spell the pacing restarts from the moment it ended instead of bursting to catch up.
    Stops after ``count`` messages.
    """
    config = hub.config
    remaining = math.inf if config.count is None else config.count
    with conn.ends_on_link_error():
        if config.fast:
            while remaining > 0:
                await hub.until_audible(conn)
                n = int(min(config.batch_size, remaining))
                await emit(n)
                remaining -= n
            return
        rate = float(config.rate or 0)
        start, k = trio.current_time(), 0
        while remaining > 0:
            k += 1
            await trio.sleep_until(start + k / rate)
            if await hub.until_audible(conn):
                start, k = trio.current_time(), 0
            await emit(1)
            remaining -= 1


async def send_heartbeats(hub: Hub, conn: Conn, send: Callable[[], Awaitable[None]]) -> None:
    """``send()`` every ``heartbeat_interval`` seconds, whatever the data does."""
    interval = hub.config.heartbeat_interval
    if interval is None:
        return
    with conn.ends_on_link_error():
        while True:
            await trio.sleep(interval)
            await hub.until_audible(conn)
            await send()
            hub.counters[conn.kind].heartbeats_sent += 1


def quote_prices(symbol_index: int, seq: int) -> tuple[float, float]:
    """A deterministic wobble around a per-symbol base price: (bid, ask)."""
    bid = round(1.1 + symbol_index * 0.25 + ((seq * 7919) % 200) * 0.00001, 5)
    return bid, round(bid + 0.0002, 5)
