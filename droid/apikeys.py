"""API keys: long-lived credentials with which programs act as their user.

A key is `droid_sk_` + base64url of 32 random bytes, shown once when it is created; only its
SHA-256 is stored (a key has 256 bits of entropy, so a fast hash is enough: nobody can guess
their way back from it). It is accepted wherever a JWT is (REST, Socket.IO, SSE), with a scope:
`read` opens GET routes, /events and the SSE stream; `write` everything its user may do.

Revocation is effective at once on every process: a REST request looks its key up in the store
each time (one indexed read; no cache that could outlive a revocation elsewhere). Sockets opened
with a key are disconnected when it is revoked: at once on the process that revoked it and, with
REDIS_URL, on every other one through a notice; without Redis the other processes find out
within KEY_SWEEP_S, by checking the keys their sockets were opened with.

It sits beside droid/auth.py, under droid.http and droid.realtime, which both verify keys; the
/events gateway (droid/realtime/gateway.py) tells it which sockets were opened with which key
(`sockets`) and how to disconnect one (`on_revoked`).
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import secrets
import time
from typing import Any, Awaitable, Callable, Protocol

from .auth import AuthError, Identity
from .errors import Conflict, NotFound
from .store import Store
from .util import iso, new_id, now_iso, utcnow

log = logging.getLogger(__name__)

PREFIX = "droid_sk_"
MAX_KEYS = 20
TOUCH_EVERY_S = 60.0
KEY_SWEEP_S = 5.0
INVALID_KEY = "Invalid API key"
SCOPE_DENIED = "API key scope does not allow this"
REVOKED_NOTICE = "apikey.revoked"
# A key does not expire: its sockets get a date no timer reaches (finite, for uvloop's timers).
NEVER = 32503680000.0  # 3000-01-01
_TOUCHED_MAX = 10_000


Disconnect = Callable[[str, dict], Awaitable[None]]
NoticeListener = Callable[[str, Any], None]


class NoticeRelay(Protocol):
    """Notices between processes (droid.realtime.cluster.RedisManager)."""

    async def publish_notice(self, kind: str, payload: Any) -> None: ...

    def listen_notices(self, listener: NoticeListener) -> None: ...


def is_api_key(token: Any) -> bool:
    return isinstance(token, str) and token.startswith(PREFIX)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_json(doc: dict) -> dict:
    return {"id": doc["_id"], "name": doc["name"], "prefix": doc["prefix"],
            "scope": doc["scope"], "createdAt": iso(doc["createdAt"]),
            "lastUsedAt": iso(doc.get("lastUsedAt"))}


class KeySockets:
    """Which sockets of this process were opened with which key (the gateway tells it)."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[str]] = {}
        self._key_of: dict[str, str] = {}

    def opened(self, sid: str, key_id: str) -> None:
        self._by_key.setdefault(key_id, set()).add(sid)
        self._key_of[sid] = key_id

    def closed(self, sid: str) -> None:
        key_id = self._key_of.pop(sid, None)
        if key_id is not None:
            sids = self._by_key.get(key_id)
            if sids is not None:
                sids.discard(sid)
                if not sids:
                    del self._by_key[key_id]

    def sids(self, key_id: str) -> list[str]:
        return list(self._by_key.get(key_id, ()))

    def key_ids(self) -> list[str]:
        return list(self._by_key)


class ApiKeys:
    """Creates, lists, verifies and revokes API keys.

    `relay`, when there are several processes, carries revocations to them (`publish_notice`)
    and theirs here (`on_notice`).
    """

    def __init__(self, store: Store, *, relay: NoticeRelay | None = None) -> None:
        self.store = store
        self.relay = relay
        self.sockets = KeySockets()
        self.disconnect: Disconnect | None = None
        if relay is not None:
            relay.listen_notices(self.on_notice)
        self._touched: dict[str, float] = {}
        self._sweeper: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # REST ------------------------------------------------------------------------------------

    async def create(self, user_id: str, *, name: str, scope: str) -> dict:
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        key = PREFIX + secret
        doc = {"_id": new_id(), "userId": user_id, "name": name, "prefix": PREFIX + secret[:8],
               "scope": scope, "keyHash": hash_key(key), "createdAt": utcnow(),
               "lastUsedAt": None}
        try:
            await self.store.insert_api_key(doc, MAX_KEYS)
        except Conflict:
            raise Conflict(f"API key limit reached ({MAX_KEYS})") from None
        log.info("user %s created API key %s (%s, %s)", user_id, doc["_id"], doc["prefix"], scope)
        return {**key_json(doc), "key": key}

    async def list(self, user_id: str) -> list[dict]:
        return [key_json(d) for d in await self.store.api_keys_of(user_id)]

    async def revoke(self, user_id: str, key_id: str) -> None:
        if not await self.store.delete_api_key(key_id, user_id):
            raise NotFound("API key not found")
        log.info("user %s revoked API key %s", user_id, key_id)
        self._touched.pop(key_id, None)
        await self.revoked(key_id)
        if self.relay is not None:
            await self.relay.publish_notice(REVOKED_NOTICE, {"keyId": key_id})

    # verification ----------------------------------------------------------------------------

    async def verify(self, key: str) -> Identity:
        """The identity a key proves; AuthError(INVALID_KEY) when it is unknown or revoked."""
        if len(key) > 256:
            raise AuthError(INVALID_KEY)
        doc = await self.store.api_key_by_hash(hash_key(key))
        if doc is None:
            raise AuthError(INVALID_KEY)
        await self._touch(doc)
        return Identity(user_id=doc["userId"], expires_at=NEVER,
                        claims={"keyId": doc["_id"], "scope": doc["scope"]},
                        scope=doc["scope"], key_id=doc["_id"])

    async def _touch(self, doc: dict) -> None:
        # lastUsedAt at most about once a minute per key: the stored value says when it was
        # last written by any process, the local stamp stops this one's concurrent requests.
        now = time.monotonic()
        last = doc.get("lastUsedAt")
        if last is not None and utcnow() - last < dt.timedelta(seconds=TOUCH_EVERY_S):
            return
        if now - self._touched.get(doc["_id"], -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return
        if len(self._touched) >= _TOUCHED_MAX:
            self._touched.clear()
        self._touched[doc["_id"]] = now
        try:
            await self.store.touch_api_key(doc["_id"], utcnow())
        except Exception:  # a missed lastUsedAt must not refuse the request
            log.warning("recording the use of API key %s failed", doc["_id"], exc_info=True)

    # sockets opened with a key ---------------------------------------------------------------

    def on_revoked(self, disconnect: Disconnect) -> None:
        """How this process ends a socket opened with a revoked key: `disconnect(sid, payload)`
        (the /events gateway, which tells `sockets` what it opens and closes)."""
        self.disconnect = disconnect

    async def revoked(self, key_id: str) -> int:
        """Disconnect this process's sockets opened with the key; how many."""
        sids = self.sockets.sids(key_id)
        for sid in sids:
            self.sockets.closed(sid)
            if self.disconnect is not None:
                await self.disconnect(sid, {"timestamp": now_iso(),
                                            "message": "API key revoked"})
        if sids:
            log.info("API key %s revoked: disconnected %d socket(s)", key_id, len(sids))
        return len(sids)

    def on_notice(self, kind: str, payload: Any) -> None:
        """Another process's notice (through the relay)."""
        if kind == REVOKED_NOTICE and isinstance(payload, dict) and \
                isinstance(payload.get("keyId"), str):
            task = asyncio.get_running_loop().create_task(self.revoked(payload["keyId"]))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)

    async def sweep(self) -> int:
        """Disconnect sockets whose key no longer exists (revoked on another process without
        Redis, or a notice lost while Redis was away). Costs one read per key in use here."""
        key_ids = self.sockets.key_ids()
        if not key_ids:
            return 0
        existing = await self.store.api_keys_existing(key_ids)
        return sum([await self.revoked(k) for k in key_ids if k not in existing])

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(KEY_SWEEP_S)
            try:
                await self.sweep()
            except Exception:
                log.warning("checking the API keys of open sockets failed; will try again",
                            exc_info=True)
