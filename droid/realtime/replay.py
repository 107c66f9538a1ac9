"""Replay and gap filling: what Delivery reads from the event store.

- `replay`: a resume (`auth.lastSeq`, `subscribe.tasks {lastSeq}`) writes the stored envelopes
  after `lastSeq` through the socket's outbox, paced by the client's reading (a long replay
  waits until the client has taken most of what was written instead of tripping the
  slow-consumer bound; a client that reads nothing for DRAIN_TIMEOUT_S is cut). Whether the
  history still reaches back to `lastSeq` is droid/tasks/history.py's question, shared with the
  SSE stream.
- `watch_gap`: an envelope that came early (another process numbered the one before it, and
  Redis has not brought it yet) is held; after GAP_WAIT_S the missing ones are read from the
  store. A hole the store never fills is skipped after GAP_GIVE_UP_S.
- `catch_up`: after a Redis outage, what this process's sockets missed meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..config import DRAIN_TIMEOUT_S
from ..store import Store
from ..tasks.history import GAP_GIVE_UP_S, GAP_WAIT_S, history_gap
from .wire import Frames

if TYPE_CHECKING:
    from .delivery import Delivery, Outbox

log = logging.getLogger("droid.delivery")

REPLAY_BATCH = 500


class History:
    """The event store, as Delivery's outboxes read it."""

    def __init__(self, delivery: "Delivery", store: Store, *, gap_wait_s: float = GAP_WAIT_S,
                 gap_give_up_s: float = GAP_GIVE_UP_S) -> None:
        self.delivery = delivery
        self.store = store
        self.gap_wait_s = gap_wait_s
        self.gap_give_up_s = gap_give_up_s
        self._tasks: set[asyncio.Task] = set()

    async def replay(self, box: "Outbox", last_seq: int | None) -> int | None:
        """Write what `box` missed after `last_seq`; see Delivery.attach."""
        user_id = box.user_id
        if last_seq is None:
            last = await self.store.last_seq(user_id)
            # Only what is published from now on, and whatever reached this socket while the
            # store was read is that, even when the read already counted it (numbered between
            # the read's start and its answer): start there, not after it.
            box.next_seq = min(last + 1, min(box.held)) if box.held else last + 1
            return None
        gap, last = await history_gap(
            self.store, user_id, last_seq, wait_s=self.gap_wait_s, give_up_s=self.gap_give_up_s,
            wanted=lambda: self.delivery.current(box) and box.subscribed)
        if gap is not None or last_seq >= last:
            box.next_seq = last + 1
            return gap
        box.next_seq = last_seq + 1
        while self.delivery.current(box) and box.subscribed:
            docs = await self.store.events_after(user_id, box.next_seq - 1, REPLAY_BATCH)
            hole = False
            for doc in docs:
                envelope = doc["envelope"]
                frames = Frames.envelope(envelope["event"], envelope)
                if not hole and envelope["seq"] == box.next_seq:
                    box.write(frames)
                    box.next_seq += 1
                    if _over(box, 2):
                        await self._drain(box)
                else:
                    # Numbered but not stored yet (or never will be): hold the rest, and
                    # let the gap watcher wait for it once the replay is over.
                    hole = True
                    box.held[envelope["seq"]] = frames
            if hole or len(docs) < REPLAY_BATCH or box.next_seq > last:
                return None
        return None

    async def _drain(self, box: "Outbox") -> None:
        """Wait until the socket's backlog is down to a quarter of the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while self.delivery.current(box) and not box.gone and _over(box, 4):
            if loop.time() > deadline:
                box.queue.cut()
                return
            await asyncio.sleep(0.005)

    def watch_gap(self, box: "Outbox") -> None:
        if box.gap_task is None or box.gap_task.done():
            box.gap_task = self._spawn(self._fill_gap(box))

    async def _fill_gap(self, box: "Outbox") -> None:
        waited = 0.0
        while box.held and self.delivery.current(box):
            await asyncio.sleep(self.gap_wait_s)
            waited += self.gap_wait_s
            if box.replaying or not box.held:
                return  # the replay releases what is held when it ends
            try:
                docs = await self.store.events_after(box.user_id, box.next_seq - 1,
                                                     min(box.held) - box.next_seq)
            except Exception:
                log.warning("reading missed envelopes for %s failed", box.sid, exc_info=True)
                docs = []
            if box.replaying or not self.delivery.current(box):
                return
            for doc in docs:
                if doc["seq"] == box.next_seq:
                    envelope = doc["envelope"]
                    box.write(Frames.envelope(envelope["event"], envelope))
                    box.next_seq += 1
            self.delivery.release(box)
            if box.held and waited >= self.gap_give_up_s:
                log.warning("client %s: envelope %d of user %s never arrived; skipping to %d",
                            box.sid, box.next_seq, box.user_id, min(box.held))
                box.next_seq = min(box.held)
                self.delivery.release(box)

    def catch_up(self, user_id: str) -> None:
        self._spawn(self._catch_up(user_id))

    async def _catch_up(self, user_id: str) -> None:
        boxes = [b for b in self.delivery.by_user.get(user_id, {}).values() if b.subscribed]
        if not boxes:
            return
        after = min(b.next_seq for b in boxes) - 1
        while True:
            docs = await self.store.events_after(user_id, after, REPLAY_BATCH)
            for doc in docs:
                self.delivery.deliver(user_id, doc["event"], doc["envelope"])
                after = doc["seq"]
            if len(docs) < REPLAY_BATCH:
                return

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


def _over(box: "Outbox", fraction: int) -> bool:
    """True when the socket holds more than 1/fraction of the slow-consumer bound."""
    messages, size = box.queue.pending()
    bound = box.queue.bound
    return messages > bound.messages // fraction or size > bound.bytes // fraction
