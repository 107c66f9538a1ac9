"""How many live /events sockets each user has: in this process, or over every process.

- `LocalPresence` counts this process's sockets by user (one process holds every socket).
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
import collections
import logging
from typing import Any, Awaitable, Callable, Iterable

import redis.asyncio as aioredis

from ..outage import Outage
from .redisconn import UNAVAILABLE

log = logging.getLogger("droid.cluster")  # the name operators know for Redis

DEFAULT_PRESENCE_TTL_S = 15.0


def presence_ttl_s(config: Any) -> float:
    """The presence TTL: Config.presence_ttl_s (DROID_PRESENCE_TTL_S) when the Config has it."""
    return float(getattr(config, "presence_ttl_s", None) or DEFAULT_PRESENCE_TTL_S)


class LocalPresence:
    """Counts each user's live sockets in this process (the Redis variant spans processes)."""

    def __init__(self) -> None:
        self._sockets: dict[str, set[str]] = collections.defaultdict(set)
        self._total = 0

    async def add(self, user_id: str, sid: str) -> int:
        sids = self._sockets[user_id]
        if sid not in sids:
            sids.add(sid)
            self._total += 1
        return len(sids)

    async def remove(self, user_id: str, sid: str) -> int:
        sids = self._sockets.get(user_id)
        if sids is not None:
            if sid in sids:
                sids.discard(sid)
                self._total -= 1
            if not sids:
                del self._sockets[user_id]
        return len(sids or ())

    async def count(self, user_id: str) -> int:
        return len(self._sockets.get(user_id, ()))

    async def total(self) -> int:
        return self._total

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass



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
    sends it in `connections.count`. With `on_changed`, the counts this class learns have changed on its
    own (a dead instance reaped, Redis back after an outage) are sent to the users' sockets too.
    """

    def __init__(self, redis: aioredis.Redis, instance_id: str, *,
                 on_changed: Callable[[str], Awaitable[None]] | None = None,
                 ttl_s: float = DEFAULT_PRESENCE_TTL_S, prefix: str = "droid") -> None:
        super().__init__()  # this process's sockets, by user
        self.redis = redis
        self.instance_id = instance_id
        self.on_changed = on_changed
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._instances = f"{prefix}:instances"
        self._prefix = f"{prefix}:presence:"
        self._hash = self._prefix + instance_id
        self._lock = asyncio.Lock()
        self._outage = Outage.of("Redis", "connection counts",
                                 "counting this process's sockets only", logger=log)
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
        """Have these users' current counts sent to all their sockets, in every process."""
        if self.on_changed is None:
            return
        for user_id in users:
            await self.on_changed(user_id)
