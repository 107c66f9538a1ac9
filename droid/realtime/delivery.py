"""Ordered delivery: this process's /events sockets by user, and each one's place in its user's
envelope stream.

**Order and exactly-once.** Every subscribed socket has an Outbox holding the next `seq` its
client expects. An envelope is written when it is that one; an older one (already sent by a
replay, or heard twice) is dropped; a newer one is held until the gap before it is filled, by
the envelope itself arriving (from this process or, over Redis, from another) or from the event
store (droid/realtime/replay.py). A replay (`attach`) advances the same counter, so resuming needs
no lock against publishing, in this process or any other: envelopes published during the replay
are held and released after it.

**Speed.** A room emit through python-socketio costs, per recipient, an asyncio task, a queue
hop, a writer wake-up with its own timer, and the framing. Here each envelope is encoded once
(droid/realtime/wire.py `Frames`: the Socket.IO packets, and the WebSocket frames holding them)
and the same bytes are written to every recipient through its session's queue
(droid/realtime/queue.py), which writes them straight to a live WebSocket and applies the
slow-consumer bound; no task per recipient.

The gateway's own events (`connected`, `pong`, `resync`, ...) are written here too (`send`), in
order with the envelopes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..store import Store
from .replay import History
from .wire import Frames

log = logging.getLogger("droid.delivery")


class Outbox:
    """What is known about one socket's place in its user's envelope stream."""

    __slots__ = ("sid", "user_id", "queue", "next_seq", "held", "replaying", "subscribed",
                 "gap_task", "attaching")

    def __init__(self, sid: str, user_id: str, queue: Any) -> None:
        self.sid = sid
        self.user_id = user_id
        self.queue = queue           # the session's SessionQueue: the door to its client
        self.next_seq = 0            # 0 until attached: nothing is delivered before that
        self.held: dict[int, Frames] = {}
        self.replaying = False
        self.subscribed = False
        self.gap_task: asyncio.Task | None = None
        self.attaching: list | None = None  # [lock, users] while a resume runs or waits

    @property
    def gone(self) -> bool:
        return self.queue.shed or getattr(self.queue.session, "closed", False)

    def write(self, frames: Frames) -> None:
        self.queue.send_frames(frames)


class Delivery:
    """The /events sockets of this process, by user, and the envelopes written to them."""

    def __init__(self, store: Store, **history: float) -> None:
        self.outboxes: dict[str, Outbox] = {}
        self.by_user: dict[str, dict[str, Outbox]] = {}
        self.history = History(self, store, **history)

    # sockets ---------------------------------------------------------------------------------

    def add(self, sid: str, user_id: str, queue: Any) -> None:
        """A socket of `user_id` whose session writes through `queue` (not yet subscribed)."""
        box = Outbox(sid, user_id, queue)
        self.outboxes[sid] = box
        self.by_user.setdefault(user_id, {})[sid] = box

    def remove(self, sid: str) -> None:
        box = self.outboxes.pop(sid, None)
        if box is None:
            return
        box.subscribed = False
        box.held.clear()
        if box.gap_task is not None:
            box.gap_task.cancel()
        boxes = self.by_user.get(box.user_id)
        if boxes is not None:
            boxes.pop(sid, None)
            if not boxes:
                del self.by_user[box.user_id]

    def current(self, box: Outbox) -> bool:
        """True while `box` is still the outbox of its socket."""
        return self.outboxes.get(box.sid) is box

    async def attach(self, sid: str, last_seq: int | None) -> int | None:
        """Subscribe a socket: write what it missed after `last_seq`, then everything new.

        Without `last_seq`, only what is published from now on. Returns the oldest seq still
        kept when the history no longer reaches back to `last_seq` (nothing is replayed then:
        the client must resync over REST), else None.
        """
        box = self.outboxes.get(sid)
        if box is None:
            return None
        if box.attaching is None:
            box.attaching = [asyncio.Lock(), 0]  # made for a resume, dropped after it
        lock = box.attaching[0]
        box.attaching[1] += 1
        try:
            async with lock:  # one replay at a time per socket
                box.subscribed = True
                box.replaying = True
                box.held.clear()
                try:
                    return await self.history.replay(box, last_seq)
                finally:
                    box.replaying = False
                    self.release(box)
        finally:
            box.attaching[1] -= 1
            if not box.attaching[1]:
                box.attaching = None

    def detach(self, sid: str) -> None:
        """Stop delivering envelopes to a socket (unsubscribe.tasks)."""
        box = self.outboxes.get(sid)
        if box is not None:
            box.subscribed = False
            box.held.clear()

    # envelopes -------------------------------------------------------------------------------

    def send(self, sid: str, event: str, payload: dict) -> None:
        """One event (not an envelope) to one socket of this process, in order with the rest."""
        box = self.outboxes.get(sid)
        if box is not None:
            box.write(Frames((event,), payload))

    def send_user(self, user_id: str, event: str, payload: dict) -> None:
        """One event (not an envelope) to every socket of a user in this process."""
        boxes = self.by_user.get(user_id)
        if boxes:
            frames = Frames((event,), payload)
            for box in list(boxes.values()):
                box.write(frames)

    def deliver(self, user_id: str, event: str, envelope: dict) -> None:
        """Hand one envelope to every local socket of its user (a publisher's listener)."""
        boxes = self.by_user.get(user_id)
        if not boxes:
            return
        frames = Frames.envelope(event, envelope)
        seq = envelope.get("seq")
        for box in list(boxes.values()):
            if not box.subscribed:
                continue
            if seq is None:  # live-only (task.progress): no place in the order to keep
                if not box.replaying:
                    box.write(frames)
            elif seq < box.next_seq:
                continue  # sent already, by a replay or from another process
            elif seq == box.next_seq and not box.replaying:
                box.write(frames)
                box.next_seq += 1
                if box.held:
                    self.release(box)
            else:
                box.held[seq] = frames
                if not box.replaying:
                    self.history.watch_gap(box)

    def release(self, box: Outbox) -> None:
        """Write the held envelopes that are next in line; watch for a gap before the rest."""
        held = box.held
        while held:
            frames = held.pop(box.next_seq, None)
            if frames is None:
                for seq in [s for s in held if s < box.next_seq]:
                    del held[seq]
                if held:
                    self.history.watch_gap(box)
                return
            box.write(frames)
            box.next_seq += 1

    def catch_up(self) -> None:
        """Look in the store for envelopes this process may have missed (Redis was away)."""
        for user_id in list(self.by_user):
            self.history.catch_up(user_id)

    async def close(self) -> None:
        await self.history.close()
