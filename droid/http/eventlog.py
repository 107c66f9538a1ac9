"""Stored task events over REST: a page of envelopes, and a Server-Sent Events stream."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging

import tornado.gen
import tornado.iostream

from ..auth import bearer
from ..config import DRAIN_TIMEOUT_S
from ..errors import Invalid
from ..tasks import history
from .schemas import EventsQuery
from ..util import dumps
from .base import ApiHandler

KEEPALIVE_S = 15.0
ENCODE_SLICE = 256 * 1024  # bytes of a page encoded between two turns of the loop
POLL_S = 1.0
BATCH = 500

log = logging.getLogger(__name__)


class EventsHandler(ApiHandler):
    """A page of stored envelopes: at most `limit`, and no more once DROID_MAX_PAGE_BYTES is
    reached (a client goes on from `lastSeq` until a page is empty). The page is encoded one
    envelope at a time, letting the loop serve others between pieces, instead of as one JSON
    document built on the loop."""

    async def get(self) -> None:
        user_id = self.user_id
        q = self.query(EventsQuery)
        items = await self.store.events_after(user_id, q.after, q.limit,
                                              max_bytes=self.config.max_page_bytes)
        last = items[-1]["seq"] if items else await self.store.last_seq(user_id)
        self.write(b'{"items":[')
        pending = 0
        for n, item in enumerate(items):
            piece = dumps(item["envelope"])
            self.write(b"," + piece if n else piece)
            item["envelope"] = None  # written: let it go
            pending += len(piece)
            if pending >= ENCODE_SLICE:
                pending = 0
                await asyncio.sleep(0)
        self.finish(b'],"lastSeq":' + str(max(last, q.after) if items else last).encode()
                    + b"}")


class EventStreamHandler(ApiHandler):
    """Live envelopes as SSE, read from the event store so that resume has no gap.

    Stored envelopes carry `id:` (their seq, what Last-Event-ID resumes after); live-only ones
    (`task.progress`) come as they are published, without `id:`. A resume point older than what
    is kept is answered with `event: resync` `{oldestSeq}` first, then what is kept.

    The stream is read from the store only as fast as the client takes it: what is written
    waits to be flushed before more is read, and one write is at most DROID_MAX_BACKLOG_BYTES
    (plus one envelope), the slow-consumer bound of the sockets. A client that takes nothing for
    DRAIN_TIMEOUT_S is disconnected (EventSource reconnects with Last-Event-ID).
    """

    def bearer_token(self) -> str | None:  # EventSource cannot send headers: ?token= too
        header = bearer(self.request.headers.get("Authorization"))
        return header or bearer(self.get_query_argument("token", None))

    async def get(self) -> None:
        user_id = self.user_id
        after, explicit = self._resume_point()
        events = self.settings["events_service"]
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        self._closed = False
        # Watching before the history is read: progress published meanwhile is held.
        wakeup = self._wakeup = events.watch(user_id)
        try:
            self.write(": droid event stream\nretry: 2000\n\n")
            if explicit:
                oldest, _ = await history.history_gap(
                    self.store, user_id, after, wanted=lambda: not self._closed,
                    give_up_s=history.GAP_GIVE_UP_S)
                if oldest is not None:
                    # What followed the resume point has expired: say so, then go on with what
                    # is kept (what GET /events?after= would return).
                    self.write(b"event: resync\ndata: " + dumps({"oldestSeq": oldest}) + b"\n\n")
                    after = oldest - 1
            await self.flush()
            idle = 0.0
            budget = self.config.max_backlog_bytes
            while not self._closed:
                wakeup.clear()  # before reading: what is published from now on wakes the wait
                written = 0
                # Live pieces first: those published before a stored envelope come before it.
                for env in wakeup.take_live():
                    data = dumps(env)
                    self.write(f"event: {env['event']}\ndata: ")  # no id: not a resume point
                    self.write(data + b"\n\n")
                    written += len(data)
                docs = await self.store.events_after(user_id, after, BATCH, max_bytes=budget)
                for doc in docs:
                    env = doc["envelope"]
                    data = dumps(env)
                    self.write(f"id: {env['seq']}\nevent: {env['event']}\ndata: ")
                    self.write(data)
                    self.write("\n\n")
                    after = env["seq"]
                    written += len(data)
                    if written >= budget:
                        break
                if written:
                    idle = 0.0
                    if not await self._drain():
                        break
                    # More is stored: a full batch, or one its byte bound ended (slim.Page).
                    if len(docs) == BATCH or written >= budget or getattr(docs, "truncated", 0):
                        continue
                elif idle >= KEEPALIVE_S:
                    idle = 0.0
                    self.write(": keepalive\n\n")
                    if not await self._drain():
                        break
                try:
                    await asyncio.wait_for(wakeup.wait(), POLL_S)
                except asyncio.TimeoutError:
                    idle += POLL_S
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            events.unwatch(user_id, wakeup)
        if not self._closed:
            self.finish()

    async def _drain(self) -> bool:
        """Flush what was written; False when the client took nothing for DRAIN_TIMEOUT_S (it
        is then disconnected) or is gone."""
        try:
            await tornado.gen.with_timeout(dt.timedelta(seconds=DRAIN_TIMEOUT_S), self.flush(),
                                           quiet_exceptions=tornado.iostream.StreamClosedError)
        except asyncio.TimeoutError:
            log.warning("SSE client %s took nothing for %.0f s: disconnecting it",
                        self.request.remote_ip, DRAIN_TIMEOUT_S)
            self._closed = True
            self.request.connection.close()
            return False
        return not self._closed

    def _resume_point(self) -> tuple[int, bool]:
        """Where to start, and whether the client named it (only then can history be lost)."""
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("after", None)
        if raw is None:
            return 0, False
        try:
            after = int(raw)
        except ValueError:
            raise Invalid("Last-Event-ID / after must be a whole number") from None
        if after < 0:
            raise Invalid("Last-Event-ID / after must be >= 0")
        return after, True

    def on_connection_close(self) -> None:
        self._closed = True
        wakeup = getattr(self, "_wakeup", None)
        if wakeup is not None:
            wakeup.set()
