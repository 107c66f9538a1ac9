"""Real-time events: the publisher (EventsService) and the /events namespace (EventsGateway).

EventsService is what the task service publishes through, once an envelope is stored (the store
numbers and stores it in the same write as the task's change, droid/store/base.py `Change`): it
hands it to Delivery (droid/delivery.py), which writes it to the owner's sockets in this process
as the specific event and as `task.event`, to the SSE streams watching the user, and to the relay
(Redis, when there are several processes), which hands it to every other process's Delivery. EventsGateway authenticates sockets, answers the client events, has Delivery replay
what a reconnecting client missed, and enforces the contract's limits.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from typing import Any, Coroutine
from urllib.parse import parse_qs

import socketio

from .auth import AuthError, Tokens, bearer
from .delivery import MAX_BACKLOG_BYTES, Delivery
from .store import Store
from .transport import run_eager
from .util import iso, now_iso

NAMESPACE = "/events"
CONNECTED_MESSAGE = "Successfully connected to real-time events"
MAX_SOCKETS_PER_USER = 20
RATE_PER_SECOND = 20

service_log = logging.getLogger("droid.EventsService")
gateway_log = logging.getLogger("droid.EventsGateway")


def presence_room(user_id: str) -> str:
    return f"sockets:{user_id}"


class EventsService:
    """Delivers task envelopes (stored already, or live-only) to the owner's sockets and SSE
    streams, here and through the relay in every other process."""

    def __init__(self, sio: socketio.AsyncServer, store: Store, metrics: Any = None,
                 relay: Any = None, *, max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        self.sio = sio
        self.store = store
        self.metrics = metrics
        # Another process's publisher: `publish_envelope(user_id, event, envelope)`, which
        # comes back through `receive` there.
        self.relay = relay
        self.delivery = Delivery(sio, store, NAMESPACE, max_backlog_bytes=max_backlog_bytes)
        if metrics is not None:
            self.delivery.on_shed = lambda sid: metrics.sockets_shed.inc()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._emitted: dict[str, Any] = {}  # events_emitted's child counter by event name

    def watch(self, user_id: str) -> asyncio.Event:
        """An event set whenever an envelope of the user is published (SSE streams)."""
        wakeup = asyncio.Event()
        self._watchers.setdefault(user_id, set()).add(wakeup)
        return wakeup

    def unwatch(self, user_id: str, wakeup: asyncio.Event) -> None:
        watchers = self._watchers.get(user_id)
        if watchers is not None:
            watchers.discard(wakeup)
            if not watchers:
                del self._watchers[user_id]

    async def publish(self, user_id: str, envelope: dict) -> None:
        """Deliver an envelope of the user: numbered and stored already, or live-only (`seq`
        None, task.progress). Envelopes stored one after the other reach it in seq order when
        their writes answer in that order (the SQLite store's one thread); otherwise each socket
        holds an early one until the one before it arrives (droid/delivery.py)."""
        event = envelope["event"]
        self.receive(user_id, event, envelope)
        if self.relay is not None:
            await self.relay.publish_envelope(user_id, event, envelope)
        else:
            # Delivery writes without waiting; let the loop serve sockets (and shed laggards)
            # between two publishes even when the store answers without waiting either.
            await asyncio.sleep(0)
        if self.metrics is not None:
            counter = self._emitted.get(event)
            if counter is None:  # labels() takes a lock and builds a key: once per event name
                counter = self._emitted[event] = self.metrics.events_emitted.labels(event=event)
            counter.inc()

    def receive(self, user_id: str, event: str, envelope: dict) -> None:
        """An envelope published here or, through the relay, by another process."""
        self.delivery.deliver(user_id, event, envelope)
        if envelope["seq"] is not None:
            for wakeup in self._watchers.get(user_id, ()):
                wakeup.set()
        service_log.debug("delivered %s seq=%s of user %s", event, envelope["seq"], user_id)


class RateLimiter:
    """A token bucket per socket: RATE_PER_SECOND events a second, bursts of the same size."""

    __slots__ = ("tokens", "stamp", "warned_at")

    def __init__(self) -> None:
        self.tokens = float(RATE_PER_SECOND)
        self.stamp = time.monotonic()
        self.warned_at = -1.0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(RATE_PER_SECOND, self.tokens + (now - self.stamp) * RATE_PER_SECOND)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class SocketState:
    """What the gateway keeps for one connected socket."""

    __slots__ = ("user_id", "expires_at", "expiry", "limiter", "subscribed")

    def __init__(self, user_id: str, expires_at: float) -> None:
        self.user_id = user_id
        self.expires_at = expires_at
        self.expiry: asyncio.TimerHandle | None = None
        self.limiter = RateLimiter()
        self.subscribed = True


class LocalPresence:
    """Counts each user's live sockets in this process (the Redis variant spans processes)."""

    def __init__(self) -> None:
        self._sockets: dict[str, set[str]] = collections.defaultdict(set)

    async def add(self, user_id: str, sid: str) -> int:
        self._sockets[user_id].add(sid)
        return len(self._sockets[user_id])

    async def remove(self, user_id: str, sid: str) -> int:
        sids = self._sockets.get(user_id)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._sockets[user_id]
        return len(sids or ())

    async def count(self, user_id: str) -> int:
        return len(self._sockets.get(user_id, ()))

    async def total(self) -> int:
        return sum(len(s) for s in self._sockets.values())

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def _token_from(environ: dict, auth: Any) -> str | None:
    """The first token found: auth.token, then the Authorization header, then ?token=."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    for value in (auth.get("token") if isinstance(auth, dict) else None,
                  environ.get("HTTP_AUTHORIZATION"), (query.get("token") or [None])[0]):
        token = bearer(value) if isinstance(value, str) else None
        if token:
            return token
    return None


def _last_seq(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seq = int(value)
    except (ValueError, OverflowError):
        return None
    return seq if seq >= 0 else None


def _peer(environ: dict) -> str:
    # python-engineio's Tornado driver puts a fixed REMOTE_ADDR in environ; ask Tornado instead.
    handler = environ.get("tornado.handler")
    return getattr(getattr(handler, "request", None), "remote_ip", None) or "?"


class EventsGateway:
    """The /events namespace."""

    def __init__(self, sio: socketio.AsyncServer, tokens: Tokens, events: EventsService,
                 presence: Any = None, metrics: Any = None) -> None:
        self.sio = sio
        self.tokens = tokens
        self.events = events
        self.presence = presence or LocalPresence()
        self.metrics = metrics
        self.sockets: dict[str, SocketState] = {}
        self._background: set[asyncio.Task] = set()
        for name, handler in (("connect", self.on_connect), ("disconnect", self.on_disconnect),
                              ("ping", self.on_ping), ("subscribe.tasks", self.on_subscribe),
                              ("unsubscribe.tasks", self.on_unsubscribe),
                              ("auth.refresh", self.on_refresh), ("*", self.on_other)):
            sio.on(name, handler, namespace=NAMESPACE)
        sio.on("connect", self.on_foreign_connect, namespace="*")

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)
        return task

    # connection ------------------------------------------------------------------------------

    async def on_foreign_connect(self, namespace: str, sid: str, environ: dict, auth: Any = None):
        gateway_log.info("refused connection from %s to namespace %s: Invalid namespace",
                         _peer(environ), namespace)
        self._count_refusal("Invalid namespace")
        raise socketio.exceptions.ConnectionRefusedError("Invalid namespace")

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        # python-engineio keeps the handshake's environ for the socket's life; its `wsgi.input`
        # is an instance of a class defined per request (2.5 KB), which nothing reads again.
        environ.pop("wsgi.input", None)
        try:
            identity = self.tokens.verify(_token_from(environ, auth))
        except AuthError as exc:
            gateway_log.info("refused connection %s from %s: %s", sid, _peer(environ),
                             exc.message)
            self._count_refusal(exc.message)
            raise socketio.exceptions.ConnectionRefusedError(exc.message, {"code": 401}) from None
        user_id = identity.user_id
        if await self.presence.add(user_id, sid) > MAX_SOCKETS_PER_USER:
            await self.presence.remove(user_id, sid)
            gateway_log.info("refused connection %s from %s of user %s: Too many connections",
                             sid, _peer(environ), user_id)
            self._count_refusal("Too many connections")
            raise socketio.exceptions.ConnectionRefusedError("Too many connections", {"code": 429})
        state = SocketState(user_id, identity.expires_at)
        self.sockets[sid] = state
        self._schedule_expiry(sid, state)
        gateway_log.info("client %s connected from %s (user %s)", sid, _peer(environ), user_id)
        # The CONNECT answer goes out once this handler returns: welcome the client after it,
        # so that `connected` follows the client's own `connect` (GuardedServer runs it right
        # after the answer, in the same turn of the loop; another server, in a task).
        last_seq = _last_seq(auth.get("lastSeq")) if isinstance(auth, dict) else None
        welcome = self._welcome(sid, state, last_seq)
        after_connect = getattr(self.sio, "after_connect", None)
        if after_connect is None or not after_connect(welcome):
            self._spawn(welcome)

    async def _welcome(self, sid: str, state: SocketState, last_seq: int | None) -> None:
        try:
            user_id = state.user_id
            if self.sockets.get(sid) is not state:
                return  # gone already
            self.events.delivery.add(sid, user_id)
            await self.sio.enter_room(sid, presence_room(user_id), namespace=NAMESPACE)
            attaching = None
            if last_seq is None:
                # Subscribed before `connected` (Delivery.attach holds what is published from
                # now on until its store read says where the user's envelopes stand), but
                # `connected` does not wait for that read: in a connection storm the answer
                # of a store call comes back turns of the loop later.
                attaching = run_eager(self._attach(sid, state, None))
            self.events.delivery.send(sid, "connected", {
                "clientId": sid, "userId": user_id, "timestamp": now_iso(),
                "message": CONNECTED_MESSAGE})
            try:
                if last_seq is not None:
                    await self._attach(sid, state, last_seq)
                await self._send_count(user_id)
            finally:
                if attaching is not None:
                    await attaching
        except Exception:
            gateway_log.exception("welcoming %s failed", sid)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        state = self.sockets.pop(sid, None)
        if state is None:
            return
        if state.expiry is not None:
            state.expiry.cancel()
        self.events.delivery.remove(sid)
        count = await self.presence.remove(state.user_id, sid)
        gateway_log.info("client %s disconnected (user %s, %s; %d open)", sid, state.user_id,
                         reason, count)
        await self._send_count(state.user_id)

    async def _send_count(self, user_id: str) -> None:
        # Counted when sent, not when connected: with two sockets arriving at once, the last
        # count sent is the right one.
        count = await self.presence.count(user_id)
        if self.events.relay is None:
            # One process holds every socket of the user: written straight to each (in order
            # with the rest, and in this turn of the loop), where python-socketio's room emit
            # starts a task per recipient, so the count would reach the client a turn after
            # `connected`, in a segment of its own.
            delivery = self.events.delivery
            for sid in list(delivery.by_user.get(user_id, ())):
                delivery.send(sid, "connections.count", {"count": count})
            return
        await self.sio.emit("connections.count", {"count": count},
                            room=presence_room(user_id), namespace=NAMESPACE)

    async def _attach(self, sid: str, state: SocketState, last_seq: int | None) -> None:
        """Deliver the user's envelopes to the socket, first what it missed after last_seq."""
        oldest = await self.events.delivery.attach(sid, last_seq)
        if oldest is not None:
            gateway_log.info("client %s: seq %d is no longer kept; resync from %d", sid,
                             last_seq, oldest)
            self.events.delivery.send(sid, "resync", {"oldestSeq": oldest})
        if not state.subscribed:  # unsubscribed meanwhile
            self.events.delivery.detach(sid)

    # token expiry ----------------------------------------------------------------------------

    def _schedule_expiry(self, sid: str, state: SocketState) -> None:
        # A timer, not a sleeping task: one per socket, and a task costs a kilobyte more.
        if state.expiry is not None:
            state.expiry.cancel()
        state.expiry = asyncio.get_running_loop().call_later(
            max(0.0, state.expires_at - time.time()), self._expired, sid, state)

    def _expired(self, sid: str, state: SocketState) -> None:
        state.expiry = None
        if self.sockets.get(sid) is state:
            self._spawn(self._expire(sid))

    async def _expire(self, sid: str) -> None:
        gateway_log.info("client %s: token expired, disconnecting", sid)
        self.events.delivery.send(sid, "auth.expired", {"timestamp": now_iso(),
                                                        "message": "Token expired"})
        await self.sio.disconnect(sid, namespace=NAMESPACE)

    # client events ---------------------------------------------------------------------------

    async def _admit(self, sid: str) -> SocketState | None:
        state = self.sockets.get(sid)
        if state is None:
            return None
        if state.limiter.allow():
            return state
        # Every dropped event is answered (the contract: "dropped and answered"); a client that
        # floods without reading its answers falls behind and is cut by the slow-consumer bound.
        self.events.delivery.send(sid, "error", {"message": "Rate limit exceeded"})
        now = time.monotonic()
        if now - state.limiter.warned_at >= 1.0:  # the log says it once a second
            state.limiter.warned_at = now
            gateway_log.info("client %s: rate limit exceeded", sid)
        return None

    async def _answer(self, sid: str, event: str, payload: dict) -> dict:
        self.events.delivery.send(sid, event, payload)
        return payload

    async def on_ping(self, sid: str, data: Any = None, *_: Any) -> dict | None:
        if await self._admit(sid) is None:
            return None
        message = data.get("message") if isinstance(data, dict) else None
        if message is not None and not isinstance(message, str):
            message = None
        return await self._answer(sid, "pong", {"timestamp": now_iso(), "clientId": sid,
                                                "message": (message or "pong")[:1000]})

    async def on_subscribe(self, sid: str, data: Any = None, *_: Any) -> dict | None:
        state = await self._admit(sid)
        if state is None:
            return None
        last_seq = _last_seq(data.get("lastSeq")) if isinstance(data, dict) else None
        state.subscribed = True
        await self._attach(sid, state, last_seq)
        return await self._answer(sid, "subscribed.tasks", {
            "userId": state.user_id, "timestamp": now_iso(),
            "message": "Successfully subscribed to task updates"})

    async def on_unsubscribe(self, sid: str, data: Any = None, *_: Any) -> dict | None:
        state = await self._admit(sid)
        if state is None:
            return None
        state.subscribed = False
        self.events.delivery.detach(sid)
        return await self._answer(sid, "unsubscribed.tasks", {
            "userId": state.user_id, "timestamp": now_iso(),
            "message": "Successfully unsubscribed from task updates"})

    async def on_refresh(self, sid: str, data: Any = None, *_: Any) -> dict | None:
        state = await self._admit(sid)
        if state is None:
            return None
        token = data.get("token") if isinstance(data, dict) else None
        try:
            identity = self.tokens.verify(bearer(token) if isinstance(token, str) else None)
        except AuthError as exc:
            gateway_log.info("client %s: token refresh refused: %s", sid, exc.message)
            return {"ok": False, "message": exc.message}
        if identity.user_id != state.user_id:
            gateway_log.info("client %s: token refresh refused: another user's token", sid)
            return {"ok": False, "message": "Token belongs to another user"}
        state.expires_at = identity.expires_at
        self._schedule_expiry(sid, state)
        return {"ok": True, "expiresAt": iso(dt.datetime.fromtimestamp(identity.expires_at,
                                                                       dt.timezone.utc))}

    async def on_other(self, event: str, sid: str, *args: Any) -> None:
        await self._admit(sid)  # unknown events count toward the rate limit, and do nothing

    def _count_refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(reason=reason).inc()

    async def connection_count(self) -> int:
        return len(self.sockets)
