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
  them (droid/delivery.py). Envelopes published while Redis is away do not travel; when a process
  subscribes again it looks in the event store for what its sockets missed. A `connections.count`
  emit is not fanned out as a value but as "this user's count changed": each process re-reads the
  count when the notice arrives, so that sockets never keep a count computed before the last
  change (see RedisManager).
- `RedisPresence` counts each user's sockets over all processes. Each process keeps a hash
  `droid:presence:{instance}` (user -> its local socket count) and a deadline in the sorted set
  `droid:instances`, both rewritten from its own in-memory truth every `ttl_s / 3` seconds. Counts
  only add up instances whose deadline has not passed, so a process that dies without cleaning up
  stops being counted at most `ttl_s` after its last heartbeat; the first live process to
  heartbeat after that removes its entries and sends the affected users their new
  `connections.count`: corrected within `ttl_s + ttl_s / 3` of the death (20 s by default). A
  restarted process has a new instance id, so it leaves no ghost beyond that bound either. Times
  are Redis's own clock (TIME in the scripts), so dyno clocks need not agree. While Redis is away
  the counts fall back to this process's sockets; on its return every process re-registers within
  one heartbeat and re-sends its users' counts.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Iterable

import redis.asyncio as aioredis
import socketio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .events import NAMESPACE, LocalPresence, presence_room
from .outage import Outage
from .util import dumps, loads

log = logging.getLogger("droid.cluster")

CHANNEL = "droid:socketio"
COUNT_EVENT = "connections.count"
DEFAULT_PRESENCE_TTL_S = 15.0
PUBLISH_RETRY_S = 1.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
KEEPALIVE_S = 15.0
POLL_S = 1.0

_COUNT_ROOM = presence_room("")

# What "Redis is not answering" looks like through redis-py.
UNAVAILABLE = (RedisError, OSError, asyncio.TimeoutError)


def presence_ttl_s(config: Any) -> float:
    """The presence TTL: Config.presence_ttl_s (DROID_PRESENCE_TTL_S) when the Config has it."""
    return float(getattr(config, "presence_ttl_s", None) or DEFAULT_PRESENCE_TTL_S)


def redis_tls_verify(config: Any) -> bool:
    """Config.redis_tls_verify (REDIS_TLS_VERIFY) when the Config has it; verify by default."""
    return bool(getattr(config, "redis_tls_verify", True))


def make_redis(url: str, *, tls_verify: bool = True) -> aioredis.Redis:
    """A redis.asyncio client for REDIS_URL, tuned to fail fast while Redis is away.

    One quick retry covers a pooled connection gone stale after a Redis restart; longer outages
    are the callers' business (they fall back to local delivery and counts). `tls_verify=False`
    accepts a self-signed certificate on `rediss://` (Heroku Key-Value Store needs it).
    """
    options: dict[str, Any] = dict(
        socket_connect_timeout=3, socket_timeout=5, socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 1))
    if not tls_verify and url.startswith("rediss://"):
        options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return aioredis.Redis.from_url(url, **options)


def make_manager(config: Any, redis: aioredis.Redis | None = None) -> "RedisManager":
    """The Socket.IO client manager for this configuration (shares `redis` when given)."""
    return RedisManager(config.redis_url, redis=redis, tls_verify=redis_tls_verify(config))


class _Outage(Outage):
    """Logs the loss of Redis once, and its return once, for one use of it."""

    def __init__(self, what: str, meanwhile: str) -> None:
        super().__init__(log, f"Redis unavailable for {what} (%s); {meanwhile} until it is back",
                         f"Redis is back for {what}")

    def failed(self, exc: BaseException) -> bool:  # type: ignore[override]
        return super().failed(f"{type(exc).__name__}: {exc}")


class RedisManager(socketio.AsyncRedisManager):
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
                 tls_verify: bool = True, publish_retry_s: float = PUBLISH_RETRY_S,
                 reconnect_max_s: float = RECONNECT_MAX_S, keepalive_s: float = KEEPALIVE_S) -> None:
        super().__init__(url, channel=channel)
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else make_redis(url, tls_verify=tls_verify)
        self.counts_channel = channel + ":counts"
        self.envelopes_channel = channel + ":envelopes"
        # Set when wiring the app: what to do with another process's task envelope, and what
        # to do after an outage of the subscription (look for envelopes missed meanwhile).
        self.on_envelope: Any = None
        self.on_resubscribed: Any = None
        self.presence: Any = None  # a RedisPresence, set when wiring the app
        self.publish_retry_s = publish_retry_s
        self.reconnect_max_s = reconnect_max_s
        self.keepalive_s = keepalive_s
        self.publishing = _Outage("publishing events", "events reach this process's sockets only")
        self.listening = _Outage("receiving events",
                                 "this process's sockets miss the other processes' events")
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
        if (event == COUNT_EVENT and namespace == NAMESPACE and self.presence is not None
                and isinstance(room, str) and room.startswith(_COUNT_ROOM)
                and not kwargs.get("ignore_queue")):
            await self.count_changed(room[len(_COUNT_ROOM):])
            return
        await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                           callback=callback, **kwargs)

    async def publish_envelope(self, user_id: str, event: str, envelope: dict) -> None:
        """Hand a task envelope to every other process (their Delivery puts it in order)."""
        await self._send(self.envelopes_channel, dumps([self.host_id, user_id, event, envelope]))

    async def count_changed(self, user_id: str) -> None:
        """The user's socket count changed: every process re-reads it and tells its sockets."""
        self._recount_soon(user_id)
        await self._send(self.counts_channel, f"{self.host_id} {user_id}")

    # python-socketio's hooks -----------------------------------------------------------------

    async def _publish(self, data: Any) -> None:
        await self._send(self.channel, self.json.dumps(data))

    def _listen(self) -> AsyncIterator[bytes]:
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
            _stopped_or_cancelled(self._closed)
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel, self.counts_channel, self.envelopes_channel)
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
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        confirmed = 0
        while True:
            message = await pubsub.get_message(timeout=POLL_S)
            _stopped_or_cancelled(self._closed)
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
                if confirmed == 3:
                    # Confirmed by Redis: from here on nothing published is missed.
                    self._subscribed.set()
                    self._tried.set()
                    if self.listening.down:
                        self._recount_everyone()  # count notices may have been missed
                        if self.on_resubscribed is not None:
                            self.on_resubscribed()  # and envelopes too
                    self.listening.recovered()
            elif kind == "message" and message["channel"] == envelopes_channel:
                self._envelope(message["data"])
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
        if host_id != self.host_id and self.on_envelope is not None:
            self.on_envelope(user_id, event, envelope)

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


def _stopped_or_cancelled(stopped: bool) -> None:
    """Raise CancelledError when the loop calling this has been told to stop.

    On Python 3.11, asyncio.wait_for returns its result and drops a cancellation that arrives
    just as the awaited operation completes (CPython gh-86296, fixed in 3.12); redis-py awaits
    every command write through wait_for. So a cancelled task can come back from a Redis call as
    if nothing happened, and a loop that only relies on cancellation may run forever: ours also
    check a flag set before they are cancelled, and hand the lost cancellation back.
    """
    if stopped:
        raise asyncio.CancelledError


# Presence --------------------------------------------------------------------------------------

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: instances zset, own hash. ARGV: instance, ttl ms, hash prefix, user1, n1, user2, n2...
# Rewrites this instance's hash, moves its deadline, and reaps instances past theirs.
# Returns {1 if this instance was not counted until now (not registered, or late), users of the
# reaped instances}.
_SYNC = _NOW_MS + """
local ttl = tonumber(ARGV[2])
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
local fresh = (not deadline or tonumber(deadline) < now) and 1 or 0
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ttl * 3)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 3)
local users, seen = {}, {}
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)) do
  local key = ARGV[3] .. inst
  for _, user in ipairs(redis.call('HKEYS', key)) do
    if not seen[user] then
      seen[user] = true
      users[#users + 1] = user
    end
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], inst)
end
return {fresh, users}
"""

# KEYS: instances zset, own hash. ARGV: instance, ttl ms, hash prefix, user, local count.
# Returns the user's count over live instances, or -1 when this instance is not registered.
_SET = _NOW_MS + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) < now then
  return -1
end
if tonumber(ARGV[5]) > 0 then
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 3)
else
  redis.call('HDEL', KEYS[2], ARGV[4])
end
local n = 0
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  n = n + (tonumber(redis.call('HGET', ARGV[3] .. inst, ARGV[4])) or 0)
end
return n
"""

# KEYS: instances zset. ARGV: hash prefix, user1, user2... Returns each user's count.
_COUNT = _NOW_MS + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local counts = {}
for i = 2, #ARGV do
  local n = 0
  for _, inst in ipairs(live) do
    n = n + (tonumber(redis.call('HGET', ARGV[1] .. inst, ARGV[i])) or 0)
  end
  counts[#counts + 1] = n
end
return counts
"""

# KEYS: instances zset. ARGV: hash prefix. Returns every socket of every live instance.
_TOTAL = _NOW_MS + """
local n = 0
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  for _, v in ipairs(redis.call('HVALS', ARGV[1] .. inst)) do
    n = n + tonumber(v)
  end
end
return n
"""


class RedisPresence(LocalPresence):
    """Each user's live sockets over every process (LocalPresence's interface; see module doc).

    `add`/`remove` return the user's count over all processes after the change, as the gateway
    sends it in `connections.count`. With `sio`, the counts this class learns have changed on its
    own (a dead instance reaped, Redis back after an outage) are sent to the users' sockets too.
    """

    def __init__(self, redis: aioredis.Redis, instance_id: str, *, sio: Any = None,
                 ttl_s: float = DEFAULT_PRESENCE_TTL_S, prefix: str = "droid") -> None:
        super().__init__()  # this process's sockets, by user
        self.redis = redis
        self.instance_id = instance_id
        self.sio = sio
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._instances = f"{prefix}:instances"
        self._prefix = f"{prefix}:presence:"
        self._hash = self._prefix + instance_id
        self._lock = asyncio.Lock()
        self._outage = _Outage("connection counts", "counting this process's sockets only")
        self._registered_once = False
        self._stopped = True
        self._task: asyncio.Task | None = None
        self._sync_script = redis.register_script(_SYNC)
        self._set_script = redis.register_script(_SET)
        self._count_script = redis.register_script(_COUNT)
        self._total_script = redis.register_script(_TOTAL)

    # the gateway's interface -----------------------------------------------------------------

    async def add(self, user_id: str, sid: str) -> int:
        await super().add(user_id, sid)
        return await self._write(user_id)

    async def remove(self, user_id: str, sid: str) -> int:
        await super().remove(user_id, sid)
        return await self._write(user_id)

    async def count(self, user_id: str) -> int:
        return (await self.counts([user_id]))[0]

    async def counts(self, user_ids: list[str]) -> list[int]:
        """These users' counts over all processes (this process's alone while Redis is away)."""
        if self._usable:
            try:
                return await self._counts(user_ids)
            except UNAVAILABLE as exc:
                self._outage.failed(exc)
        return [self._local(u) for u in user_ids]

    async def total(self) -> int:
        if self._usable:
            try:
                return int(await self._total_script(keys=[self._instances], args=[self._prefix]))
            except UNAVAILABLE as exc:
                self._outage.failed(exc)
        return await super().total()

    async def start(self) -> None:
        """Register this process, then heartbeat every ttl_s / 3 seconds."""
        self._stopped = False
        try:
            async with self._lock:
                await self._sync()
        except UNAVAILABLE as exc:
            self._outage.failed(exc)
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def stop(self) -> None:
        """Leave: remove this process's entries and send its users their counts without it."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.interval_s + 5)
            self._task = None
        users = list(self._sockets)
        try:
            async with self._lock:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(self._hash).zrem(self._instances, self.instance_id)
                    await pipe.execute()
            await self._notify(users)
        except UNAVAILABLE as exc:
            log.info("could not remove this process's connection counts from Redis (%s); "
                     "they expire within %.0f s", exc, self.ttl_s)

    # internals -------------------------------------------------------------------------------

    @property
    def _usable(self) -> bool:
        return not self._stopped and not self._outage.down

    def _local(self, user_id: str) -> int:
        return len(self._sockets.get(user_id, ()))

    async def _write(self, user_id: str) -> int:
        """Store this process's count of the user; return the user's count over all processes."""
        if not self._usable:
            return self._local(user_id)
        try:
            async with self._lock:
                count = int(await self._set_script(
                    keys=[self._instances, self._hash],
                    args=[self.instance_id, self._ttl_ms, self._prefix, user_id,
                          self._local(user_id)]))
                changed: set[str] = set()
                if count < 0:  # not registered (Redis restarted, or this process was reaped)
                    changed = await self._sync()
                    count = (await self._counts([user_id]))[0]
        except UNAVAILABLE as exc:
            self._outage.failed(exc)
            return self._local(user_id)
        changed.discard(user_id)
        await self._notify(changed)
        return count

    async def _sync(self) -> set[str]:
        """Rewrite this process's entries (call with the lock held); return users to notify."""
        args: list[Any] = [self.instance_id, self._ttl_ms, self._prefix]
        for user_id, sids in self._sockets.items():
            args += [user_id, len(sids)]
        fresh, reaped = await self._sync_script(keys=[self._instances, self._hash], args=args)
        users = {u.decode() if isinstance(u, bytes) else u for u in reaped}
        if fresh and self._registered_once:
            # Redis lost us (restarted) or we were late: counts sent meanwhile left ours out.
            users.update(self._sockets)
        self._registered_once = True
        return users

    async def _counts(self, users: list[str]) -> list[int]:
        return [int(n) for n in await self._count_script(keys=[self._instances],
                                                         args=[self._prefix, *users])]

    async def _heartbeat(self) -> None:
        while not self._stopped:
            await asyncio.sleep(min(self.interval_s, 1.0) if self._outage.down
                                else self.interval_s)
            if self._stopped:
                return  # stop() cancelled us, and the cancellation was lost in redis-py
            try:
                await self._beat()
            except Exception:
                log.exception("presence heartbeat failed")

    async def _beat(self) -> None:
        try:
            async with self._lock:
                users = await self._sync()
        except UNAVAILABLE as exc:
            self._outage.failed(exc)
            return
        if self._outage.down:
            self._outage.recovered()
            users.update(self._sockets)  # they were sent local counts meanwhile
        await self._notify(users)

    async def _notify(self, users: Iterable[str]) -> None:
        """Send these users' current counts to all their sockets, in every process."""
        users = list(users)
        if not users or self.sio is None:
            return
        try:
            counts = await self._counts(users)  # even once stopped: the others' counts, without us
        except UNAVAILABLE as exc:
            self._outage.failed(exc)
            counts = [self._local(u) for u in users]
        for user_id, count in zip(users, counts):
            await self.sio.emit(COUNT_EVENT, {"count": count}, room=presence_room(user_id),
                                namespace=NAMESPACE)
