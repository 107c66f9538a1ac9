"""Several Droid processes, one event stream: Socket.IO fan-out and connection counts over Redis.

Used when REDIS_URL is set. Why Redis rather than AMQP (python-socketio supports both): Redis is
what Heroku offers as an add-on, and one dependency serves both needs here, pub/sub for the
fan-out and keys that expire for the connection counts.

- `RedisManager` is python-socketio's AsyncRedisManager made to survive Redis outages. An emit is
  delivered to this process's sockets first, then published so that every other process delivers
  it to its own; a process with no sockets (a worker, a REST call) publishes all the same. When
  Redis is unreachable, emits still reach local sockets, the failure is logged once (not once per
  event), publishing is retried at most once a second, and the listener re-subscribes by itself
  (backoff 0.1 s doubling to 5 s), logging once when it loses Redis and once when it is back.
  Task envelopes travel on their own channel (`publish_envelope`) and are handed to the receiving
  process's Delivery, which puts each socket's envelopes in seq order whichever process numbered
  them (droid/realtime/delivery.py). Envelopes published while Redis is away do not travel; when a process
  subscribes again it looks in the event store for what its sockets missed. A `connections.count`
  emit is not fanned out as a value but as "this user's count changed": each process re-reads the
  count when the notice arrives, so that sockets never keep a count computed before the last
  change (see RedisManager). Notices between processes (an API key revoked, droid/apikeys.py)
  travel on a channel of their own too (`publish_notice`, `listen_notices`).

Connection counts over processes are droid/realtime/presence.py's.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from ..outage import Outage
from ..util import dumps, loads
from .presence import DEFAULT_PRESENCE_TTL_S, RedisPresence, presence_ttl_s
from .rooms import IndexedRedisManagerBase
from .redisconn import UNAVAILABLE, make_redis, redis_tls_verify, stopped_or_cancelled
from .wire import COUNT_EVENT, NAMESPACE, presence_room

log = logging.getLogger("droid.cluster")

CHANNEL = "droid:socketio"
PUBLISH_RETRY_S = 1.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
REDIS_KEEPALIVE_S = 15.0  # a subscription silent this long is PINGed; twice this, reconnected
POLL_S = 1.0

_COUNT_ROOM = presence_room("")


def make_manager(config: Any, redis: aioredis.Redis | None = None) -> "RedisManager":
    """The Socket.IO client manager for this configuration (shares `redis` when given)."""
    return RedisManager(config.redis_url, redis=redis, tls_verify=redis_tls_verify(config),
                        instance_id=config.instance_id, presence_ttl_s=presence_ttl_s(config))


class RedisManager(IndexedRedisManagerBase):
    """AsyncRedisManager that delivers locally whatever Redis does, and reconnects by itself.

    Stock python-socketio 5.18 already delivers an emit locally before publishing it, and its
    `_publish` swallows errors; but it logs two errors for every event while Redis is away, makes
    a new Redis client (never closed) on every failed attempt, and backs off re-subscribing up to
    60 s. This subclass keeps its message format and dispatch (`_thread`, `_handle_emit`) and
    replaces the Redis side: one shared client, publish failures logged once and retried at most
    once a second, a listener with a 5 s backoff cap and a keepalive that notices a silent
    connection, and `start()`/`close()` so that the listener runs from start-up (not from the
    first connection) and stops with the process.

    Connection counts are not fanned out as values. Two processes that each compute a user's count
    and publish it can be heard in either order, and a socket would keep the older, wrong value
    (this happens whenever a user's sockets reconnect to several processes at once, after a
    deploy). So an emit of `connections.count` to a user's `sockets:{userId}` room becomes a
    notice on a second channel, and every process holding sockets of that user reads the count
    from `presence` when the notice arrives and tells its own sockets: one reader at a time per
    process, so the last value a socket receives was read after the last change. Notices sent
    while a process was not subscribed are lost, so on subscribing again after an outage it
    recounts all its users and has the others recount them too.
    """

    name = "droid-redis"

    def __init__(self, url: str, *, redis: aioredis.Redis | None = None, channel: str = CHANNEL,
                 tls_verify: bool = True, instance_id: str,
                 presence_ttl_s: float = DEFAULT_PRESENCE_TTL_S,
                 publish_retry_s: float = PUBLISH_RETRY_S,
                 reconnect_max_s: float = RECONNECT_MAX_S, keepalive_s: float = REDIS_KEEPALIVE_S) -> None:
        super().__init__(url, channel=channel)
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else make_redis(url, tls_verify=tls_verify)
        self.counts_channel = channel + ":counts"
        self.envelopes_channel = channel + ":envelopes"
        self.notices_channel = channel + ":notices"
        # Each user's sockets over every process; a count it learns has changed on its own (a
        # dead process reaped, Redis back) is announced like any other change.
        self.presence = RedisPresence(self.redis, instance_id, ttl_s=presence_ttl_s,
                                      on_changed=self.count_changed)
        self._on_envelope: Callable[[str, str, dict], None] | None = None
        self._on_resubscribed: Callable[[], None] | None = None
        self._notice_listeners: list[Callable[[str, Any], None]] = []
        self.publish_retry_s = publish_retry_s
        self.reconnect_max_s = reconnect_max_s
        self.keepalive_s = keepalive_s
        self.publishing = Outage.of("Redis", "publishing events",
                                    "events reach this process's sockets only", logger=log)
        self.listening = Outage.of("Redis", "receiving events",
                                   "this process's sockets miss the other processes' events",
                                   logger=log)
        self.publish_failures = 0  # attempts that failed (at most one a second while Redis is away)
        self._retry_at = 0.0
        self._closed = False
        self._subscribed = asyncio.Event()
        self._tried = asyncio.Event()
        self._listener: AsyncIterator[bytes] | None = None
        self._recount: set[str] = set()
        self._announce: set[str] = set()
        self._recount_wakeup = asyncio.Event()
        self._recounter: asyncio.Task | None = None

    def subscribe(self, on_envelope: Callable[[str, str, dict], None],
                  on_resubscribed: Callable[[], None]) -> None:
        """What to do with another process's task envelope (the publisher's `receive`), and after
        an outage of the subscription (look in the store for envelopes missed meanwhile)."""
        self._on_envelope = on_envelope
        self._on_resubscribed = on_resubscribed

    def listen_notices(self, listener: Callable[[str, Any], None]) -> None:
        """Call `listener(kind, payload)` with every other process's notice (`publish_notice`)."""
        self._notice_listeners.append(listener)

    @property
    def subscribed(self) -> bool:
        """True while this process receives the other processes' events."""
        return self._subscribed.is_set()

    async def start(self, timeout: float = 5.0) -> None:
        """Start listening now, and wait (a bounded time) for the first subscription attempt."""
        if not self.server.manager_initialized:
            self.server.manager_initialized = True
            self.initialize()
        self._recounter = asyncio.get_running_loop().create_task(self._recount_loop())
        try:
            await asyncio.wait_for(self._tried.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if not self.subscribed:
            log.warning("Redis is not reachable at start-up; retrying in the background")

    async def close(self) -> None:
        """Stop listening and publishing (emits then reach this process's sockets only)."""
        self._closed = True
        self._recount_wakeup.set()
        tasks = [t for t in (getattr(self, "thread", None), self._recounter) if t is not None]
        pending: set = set()
        for task in tasks:
            task.cancel()
        if tasks:
            # The loops also watch _closed: on Python 3.11 a cancellation can be lost inside
            # redis-py (see _stopped_or_cancelled), and they must end all the same.
            _, pending = await asyncio.wait(tasks, timeout=5)
            if pending:
                log.warning("Redis listener did not stop in time")
        if self._listener is not None and not pending:
            await self._listener.aclose()  # type: ignore[attr-defined]
        if self._owns_redis:
            await self.redis.aclose()

    async def emit(self, event: str, data: Any, namespace: str | None = None,
                   room: Any = None, skip_sid: Any = None, callback: Any = None, to: Any = None,
                   **kwargs: Any) -> None:
        room = to or room
        if (event == COUNT_EVENT and namespace == NAMESPACE 
                and isinstance(room, str) and room.startswith(_COUNT_ROOM)
                and not kwargs.get("ignore_queue")):
            await self.count_changed(room[len(_COUNT_ROOM):])
            return
        await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                           callback=callback, **kwargs)

    async def publish_envelope(self, user_id: str, event: str, envelope: dict) -> None:
        """Hand a task envelope to every other process (their Delivery puts it in order)."""
        await self._send(self.envelopes_channel, dumps([self.host_id, user_id, event, envelope]))

    async def publish_notice(self, kind: str, payload: Any) -> None:
        """Tell every other process something; their `listen_notices` listeners hear it."""
        await self._send(self.notices_channel, dumps([self.host_id, kind, payload]))

    async def count_changed(self, user_id: str) -> None:
        """The user's socket count changed: every process re-reads it and tells its sockets."""
        self._recount_soon(user_id)
        await self._send(self.counts_channel, f"{self.host_id} {user_id}")

    # python-socketio's hooks -----------------------------------------------------------------

    async def publish_raw(self, data: Any) -> None:
        await self._send(self.channel, self.json.dumps(data))

    def listen_raw(self) -> AsyncIterator[bytes]:
        self._listener = self._messages()
        return self._listener

    # publishing ------------------------------------------------------------------------------

    async def _send(self, channel: str, payload: str | bytes) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self.publishing.down and not self.subscribed and loop.time() < self._retry_at:
            return  # Redis is away: try again once a second, or as soon as we hear from it
        try:
            await self.redis.publish(channel, payload)
        except UNAVAILABLE as exc:
            self.publish_failures += 1
            self._retry_at = loop.time() + self.publish_retry_s
            self.publishing.failed(exc)
            return
        self.publishing.recovered()

    # the listener ----------------------------------------------------------------------------

    async def _messages(self) -> AsyncIterator[bytes]:
        """Every message on the channel, subscribing again (with backoff) whenever Redis drops."""
        delay = RECONNECT_MIN_S
        while True:
            stopped_or_cancelled(self._closed)
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel, self.counts_channel, self.envelopes_channel,
                                       self.notices_channel)
                async for data in self._read(pubsub):
                    yield data
            except UNAVAILABLE as exc:
                self.listening.failed(exc)
            finally:
                if self.subscribed:
                    delay = RECONNECT_MIN_S  # it worked for a while: retry quickly
                self._subscribed.clear()
                self._tried.set()
                await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    async def _read(self, pubsub: Any) -> AsyncIterator[bytes]:
        channel, counts_channel = self.channel.encode(), self.counts_channel.encode()
        envelopes_channel = self.envelopes_channel.encode()
        notices_channel = self.notices_channel.encode()
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        confirmed = 0
        while True:
            message = await pubsub.get_message(timeout=POLL_S)
            stopped_or_cancelled(self._closed)
            now = loop.time()
            if message is None:
                silent = now - heard
                if silent > 2 * self.keepalive_s:
                    raise RedisConnectionError("no answer to PING on the subscription")
                if silent > self.keepalive_s and not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            kind = message["type"]
            if kind == "subscribe":
                confirmed += 1
                if confirmed == 4:
                    # Confirmed by Redis: from here on nothing published is missed.
                    self._subscribed.set()
                    self._tried.set()
                    if self.listening.down:
                        self._recount_everyone()  # count notices may have been missed
                        if self._on_resubscribed is not None:
                            self._on_resubscribed()  # and envelopes too
                    self.listening.recovered()
            elif kind == "message" and message["channel"] == envelopes_channel:
                self._envelope(message["data"])
            elif kind == "message" and message["channel"] == notices_channel:
                self._notice(message["data"])
            elif kind == "message" and message["channel"] == channel:
                yield message["data"]
            elif kind == "message" and message["channel"] == counts_channel:
                host_id, _, user_id = message["data"].decode().partition(" ")
                if host_id != self.host_id:  # ours was recounted when it was sent
                    self._recount_soon(user_id)

    def _envelope(self, data: bytes) -> None:
        try:
            host_id, user_id, event, envelope = loads(data)
        except (ValueError, TypeError):
            log.warning("ignored a malformed envelope on %s", self.envelopes_channel)
            return
        if host_id != self.host_id and self._on_envelope is not None:
            self._on_envelope(user_id, event, envelope)

    def _notice(self, data: bytes) -> None:
        try:
            host_id, kind, payload = loads(data)
        except (ValueError, TypeError):
            log.warning("ignored a malformed notice on %s", self.notices_channel)
            return
        if host_id != self.host_id:
            for listener in self._notice_listeners:
                listener(kind, payload)

    # counts ----------------------------------------------------------------------------------

    def _recount_soon(self, user_id: str, *, announce: bool = False) -> None:
        if self._has_local(_COUNT_ROOM + user_id):
            self._recount.add(user_id)
            if announce:
                self._announce.add(user_id)
            self._recount_wakeup.set()

    def _recount_everyone(self) -> None:
        """After an outage: count notices were missed both ways, so recount and tell the others
        to (they may have re-read the counts before this process re-registered)."""
        for room in list(self.rooms.get(NAMESPACE, {})):
            if isinstance(room, str) and room.startswith(_COUNT_ROOM):
                self._recount_soon(room[len(_COUNT_ROOM):], announce=True)

    def _has_local(self, room: str) -> bool:
        return next(iter(self.get_participants(NAMESPACE, room)), None) is not None

    async def _recount_loop(self) -> None:
        while not self._closed:
            await self._recount_wakeup.wait()
            self._recount_wakeup.clear()
            if self._closed:
                return
            users = [u for u in self._recount if self._has_local(_COUNT_ROOM + u)]
            announce = list(self._announce)
            self._recount.clear()
            self._announce.clear()
            try:
                if users:
                    for user_id, count in zip(users, await self.presence.counts(users)):
                        await self.emit(COUNT_EVENT, {"count": count}, namespace=NAMESPACE,
                                        room=_COUNT_ROOM + user_id, ignore_queue=True)
                for user_id in announce:
                    await self._send(self.counts_channel, f"{self.host_id} {user_id}")
            except Exception:
                log.exception("sending connection counts failed")
