"""The Redis connection of a multi-process deployment, and what failure looks like through it."""
from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

# What "Redis is not answering" looks like through redis-py.
UNAVAILABLE = (RedisError, OSError, asyncio.TimeoutError)


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


def stopped_or_cancelled(stopped: bool) -> None:
    """Raise CancelledError when the loop calling this has been told to stop.

    On Python 3.11, asyncio.wait_for returns its result and drops a cancellation that arrives
    just as the awaited operation completes (CPython gh-86296, fixed in 3.12); redis-py awaits
    every command write through wait_for. So a cancelled task can come back from a Redis call as
    if nothing happened, and a loop that only relies on cancellation may run forever: ours also
    check a flag set before they are cancelled, and hand the lost cancellation back.
    """
    if stopped:
        raise asyncio.CancelledError
