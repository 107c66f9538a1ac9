"""Resuming from the event log: does what is kept still reach back to a client's resume point?

A socket's resume (`lastSeq`, droid/realtime/replay.py) and the SSE stream's (`Last-Event-ID`,
droid/http/eventlog.py) ask the same question, the same way.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from ..store import Store

GAP_WAIT_S = 0.2
GAP_GIVE_UP_S = 3.0
# A resume whose next seqs are missing from the store waits for them (up to GAP_GIVE_UP_S) only
# when so few are missing that publishers still storing them could explain it.
IN_FLIGHT_MAX = 64


async def history_gap(store: Store, user_id: str, after: int, *,
                      wanted: Callable[[], bool] = lambda: True, wait_s: float = GAP_WAIT_S,
                      give_up_s: float = GAP_GIVE_UP_S) -> tuple[int | None, int]:
    """(gap, last). `gap` is the oldest seq still kept when the history no longer reaches back
    to `after + 1` (the client must resync: nothing is replayed), else None; `last` is the
    user's last seq when it answered.

    What follows `after` and is not stored is either expired or numbered by a publisher, here or
    in another process, that has not stored it yet: the second is only ever the newest few
    seqs, and lasts milliseconds, so it is waited for (`wait_s` at a time, up to `give_up_s`,
    while `wanted()`) rather than reported as lost history.
    """
    waited = 0.0
    last = await store.last_seq(user_id)
    while True:
        if after >= last:
            return None, last
        oldest = await store.oldest_seq(user_id)
        if oldest is not None and oldest <= after + 1:
            return None, last
        missing = (last if oldest is None else oldest - 1) - after
        if missing > IN_FLIGHT_MAX or waited >= give_up_s:
            return (oldest if oldest is not None else last + 1), last
        await asyncio.sleep(wait_s)
        waited += wait_s
        if not wanted():
            return None, last
        last = await store.last_seq(user_id)
