"""The /events namespace (EventsGateway): who may connect, the client events, and the limits.

It authenticates sockets, registers each with Delivery (droid/realtime/delivery.py) and with
presence (droid/realtime/presence.py), has Delivery replay what a reconnecting client missed,
answers `ping`, `subscribe.tasks`, `unsubscribe.tasks` and `auth.refresh`, disconnects a socket
whose token expires or whose API key is revoked (droid/apikeys.py), tells a user's sockets on
every process what other parts of Droid have to say (`notify`: webhook.disabled), and enforces
the contract's limits (sockets per user, client events a second). Its log lines carry the name `EventsGateway`, as the original protocol document says.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any, Coroutine, Protocol
from urllib.parse import parse_qs

import socketio

from ..apikeys import ApiKeys, is_api_key
from ..auth import AuthError, Tokens, bearer
from ..util import iso, now_iso
from .delivery import Delivery
from .eager import run_eager
from .guard import GuardedServer
from .eager import QUIET
from .wire import COUNT_EVENT, NAMESPACE, presence_room

CONNECTED_MESSAGE = "Successfully connected to real-time events"
MAX_SOCKETS_PER_USER = 20
RATE_PER_SECOND = 20

gateway_log = logging.getLogger("droid.EventsGateway")


class Presence(Protocol):
    """Each user's live /events sockets (droid/realtime/presence.py): add/remove return the
    user's count after the change, over every process."""

    async def add(self, user_id: str, sid: str) -> int: ...

    async def remove(self, user_id: str, sid: str) -> int: ...

    async def count(self, user_id: str) -> int: ...


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
        self.limiter: RateLimiter | None = None  # made at the socket's first client event
        self.subscribed = True



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
    return environ.get("REMOTE_ADDR") or "?"  # the client's (droid/realtime/environ.py)


class EventsGateway:
    """The /events namespace."""

    def __init__(self, sio: GuardedServer, tokens: Tokens, delivery: Delivery,
                 presence: Presence, *, metrics: Any = None, counts_by_room: bool = False,
                 api_keys: ApiKeys | None = None) -> None:
        """`counts_by_room`: send `connections.count` through python-socketio's room emit (its
        Redis manager then has every process recount; see droid/realtime/cluster.py) instead of
        writing it to this process's sockets of the user. `api_keys`: keys are accepted where
        tokens are, and the sockets opened with one are disconnected when it is revoked."""
        self.sio = sio
        self.tokens = tokens
        self.delivery = delivery
        self.presence = presence
        self.metrics = metrics
        self.counts_by_room = counts_by_room
        self.api_keys = api_keys
        if api_keys is not None:
            api_keys.on_revoked(self.disconnect_revoked)
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
            token = _token_from(environ, auth)
            if self.api_keys is not None and is_api_key(token):  # hook: API keys (apikeys.py)
                identity = await self.api_keys.verify(token)
            else:
                identity = self.tokens.verify(token)
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
        if identity.key_id is not None and self.api_keys is not None:
            self.api_keys.sockets.opened(sid, identity.key_id)  # disconnected on revocation
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
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
            session = self.sio.eio.session(eio_sid)
            if session is None:
                return  # gone already
            self.delivery.add(sid, user_id, session.queue)
            if self.counts_by_room:
                await self.sio.enter_room(sid, presence_room(user_id), namespace=NAMESPACE)
            attaching = None
            if last_seq is None:
                # Subscribed before `connected` (Delivery.attach holds what is published from
                # now on until its store read says where the user's envelopes stand), but
                # `connected` does not wait for that read: in a connection storm the answer
                # of a store call comes back turns of the loop later.
                attaching = run_eager(self._attach(sid, state, None))
            self.delivery.send(sid, "connected", {
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
        if self.api_keys is not None:
            self.api_keys.sockets.closed(sid)
        if state.expiry is not None:
            state.expiry.cancel()
        self.delivery.remove(sid)
        count = await self.presence.remove(state.user_id, sid)
        gateway_log.info("client %s disconnected (user %s, %s; %d open)", sid, state.user_id,
                         reason, count)
        await self._send_count(state.user_id)

    async def _send_count(self, user_id: str) -> None:
        # Counted when sent, not when connected: with two sockets arriving at once, the last
        # count sent is the right one.
        count = await self.presence.count(user_id)
        if not self.counts_by_room:
            # One process holds every socket of the user: written straight to each (in order
            # with the rest, and in this turn of the loop), where python-socketio's room emit
            # starts a task per recipient, so the count would reach the client a turn after
            # `connected`, in a segment of its own.
            self.delivery.send_user(user_id, COUNT_EVENT, {"count": count})
            return
        await self.sio.emit(COUNT_EVENT, {"count": count}, room=presence_room(user_id),
                            namespace=NAMESPACE)

    async def notify(self, user_id: str, event: str, data: dict) -> None:
        """Send an event to every socket of the user, on every process."""
        if not self.counts_by_room:  # this process holds every socket
            self.delivery.send_user(user_id, event, data)
            return
        # Every socket of the user is in their room; python-socketio's Redis manager emits to
        # the other processes' members too.
        await self.sio.emit(event, data, room=presence_room(user_id), namespace=NAMESPACE)

    async def _attach(self, sid: str, state: SocketState, last_seq: int | None) -> None:
        """Deliver the user's envelopes to the socket, first what it missed after last_seq."""
        oldest = await self.delivery.attach(sid, last_seq)
        if oldest is not None:
            gateway_log.info("client %s: seq %d is no longer kept; resync from %d", sid,
                             last_seq, oldest)
            self.delivery.send(sid, "resync", {"oldestSeq": oldest})
        if not state.subscribed:  # unsubscribed meanwhile
            self.delivery.detach(sid)

    # token expiry ----------------------------------------------------------------------------

    def _schedule_expiry(self, sid: str, state: SocketState) -> None:
        # A timer, not a sleeping task: one per socket, and a task costs a kilobyte more.
        if state.expiry is not None:
            state.expiry.cancel()
        state.expiry = asyncio.get_running_loop().call_later(
            max(0.0, state.expires_at - time.time()), self._expired, sid, state,
            context=QUIET)

    def _expired(self, sid: str, state: SocketState) -> None:
        state.expiry = None
        if self.sockets.get(sid) is state:
            self._spawn(self._expire(sid))

    async def disconnect_revoked(self, sid: str, payload: dict) -> None:
        """Hook of droid/apikeys.py: the socket's API key was revoked."""
        if sid in self.sockets:
            gateway_log.info("client %s: API key revoked, disconnecting", sid)
            self.delivery.send(sid, "auth.revoked", payload)
            await self.sio.disconnect(sid, namespace=NAMESPACE)

    async def _expire(self, sid: str) -> None:
        gateway_log.info("client %s: token expired, disconnecting", sid)
        self.delivery.send(sid, "auth.expired", {"timestamp": now_iso(),
                                                        "message": "Token expired"})
        await self.sio.disconnect(sid, namespace=NAMESPACE)

    # client events ---------------------------------------------------------------------------

    async def _admit(self, sid: str) -> SocketState | None:
        state = self.sockets.get(sid)
        if state is None:
            return None
        limiter = state.limiter
        if limiter is None:
            limiter = state.limiter = RateLimiter()
        if limiter.allow():
            return state
        # Every dropped event is answered (the contract: "dropped and answered"); a client that
        # floods without reading its answers falls behind and is cut by the slow-consumer bound.
        self.delivery.send(sid, "error", {"message": "Rate limit exceeded"})
        now = time.monotonic()
        if now - limiter.warned_at >= 1.0:  # the log says it once a second
            limiter.warned_at = now
            gateway_log.info("client %s: rate limit exceeded", sid)
        return None

    async def _answer(self, sid: str, event: str, payload: dict) -> dict:
        self.delivery.send(sid, event, payload)
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
        self.delivery.detach(sid)
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
