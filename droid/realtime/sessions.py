"""Engine.IO sessions that are not on /events: how many a client address and the process may
hold, how long they may wait, and what is freed when they end.

A handshake (`GET /socket.io/?EIO=4&transport=...` without `sid`) makes an Engine.IO session
before anyone knows who its client is: about 7.7 KB each. Nothing bounded them (issue 22,
finding 1: one client made 81,404 in 30 s over 4 keep-alive connections, RSS 77 -> 691 MiB, still
698 MiB 50 s after). Here:

- **Caps.** A handshake is admitted only while its client address holds fewer than
  `per_address` sessions not on /events (DROID_ANON_SESSIONS_PER_ADDRESS; IPv6 addresses count
  by their /64, which one client holds whole) and the process fewer than `total`
  (DROID_ANON_SESSIONS). Otherwise it is answered before python-engineio sees it: `429` (the
  address) or `503` (the process), in the error shape, with `Retry-After`. A session stops
  counting when it joins /events or ends. The address is the one the access log shows
  (droid/http/front.py decides it, proxies included).
- **Deadlines.** A session that has not sent a Socket.IO CONNECT within `connect_s` of its
  handshake (DROID_CONNECT_PACKET_TIMEOUT_S, 10 s; clients send it at once) is ended; one that
  has, but is not on /events within `join_s` (DROID_JOIN_TIMEOUT_S, 45 s: socket.io's
  connectTimeout), too. One timer per waiting session, cancelled when it joins or ends.
- **Leaving.** A session that leaves /events but stays open is ended at its next ping
  (`wanted`, asked by the ping wheel, droid/realtime/pings.py).
- **The end.** What python-engineio and Droid hold of an ended session goes at once (see
  `GuardedServer.on_session_end`): python-engineio's service task, which walked a copy of every
  session's list for up to `ping_timeout` (20 s), holding ended ones, is off (`monitor_clients`
  False; the ping wheel does its ping deadlines, for long-polling too).

`admitting(handler_class, sessions)` is the Tornado side (admission); GuardedServer
(droid/realtime/guard.py) reports each session's opening, CONNECT, joining and end.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import time
from typing import Any, Callable

from ..web import write_error

log = logging.getLogger("droid.sessions")

RETRY_AFTER_S = 2
EXPIRY_BATCH = 100  # sessions ended per turn of the loop
PER_ADDRESS_MESSAGE = "Too many Socket.IO sessions from this address"
TOTAL_MESSAGE = "Too many Socket.IO sessions"


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    per_address: int = 100
    total: int = 5000
    connect_s: float = 10.0
    join_s: float = 45.0

    @classmethod
    def from_config(cls, config: Any) -> "SessionLimits":
        return cls(config.anon_sessions_per_address, config.anon_sessions,
                   config.connect_packet_timeout_s, config.join_timeout_s)


def address_key(address: str | None) -> str:
    """What the per-address cap counts by: an IPv4 address, or an IPv6 address's /64."""
    if not address or ":" not in address:
        return address or "?"
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Waiting:
    """One session not on /events (or a handshake admitted and not yet a session)."""

    __slots__ = ("key", "sid", "timer", "opened", "connecting")

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.sid: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.opened = 0.0
        self.connecting = False


class AnonSessions:
    """The sessions not on /events, by sid and counted by address; `expire(sid, why)` is called
    when one passes its deadline."""

    def __init__(self, limits: SessionLimits,
                 expire: Callable[[str, str], None] | None = None) -> None:
        self.limits = limits
        self.expire = expire
        self.on_answered: Callable[[str, Any], None] | None = None
        self.count = 0
        self.by_address: dict[str, int] = {}
        self.by_sid: dict[str, Waiting] = {}
        self._expiring: collections.deque[tuple[str, bool]] = collections.deque()

    # admission (the Tornado handler)

    def admit(self, address: str | None) -> Waiting:
        """Count a handshake from `address` in, or raise Refused."""
        key = address_key(address)
        held = self.by_address.get(key, 0)
        if held >= self.limits.per_address:
            raise Refused(429, PER_ADDRESS_MESSAGE)
        if self.count >= self.limits.total:
            raise Refused(503, TOTAL_MESSAGE)
        self.by_address[key] = held + 1
        self.count += 1
        return Waiting(key)

    def release(self, waiting: Waiting | None) -> None:
        """The handshake `waiting` was admitted for made no session."""
        if waiting is not None and waiting.sid is None and waiting.key is not None:
            self._uncount(waiting)

    # a session's life (GuardedServer)

    def opened(self, waiting: Waiting | None, sid: str) -> None:
        """A session was made for an admitted handshake (or, None, one that was not counted
        at the door: it is counted now, in the total)."""
        if waiting is None:
            waiting = Waiting("?")
            self.count += 1
            self.by_address["?"] = self.by_address.get("?", 0) + 1
        elif waiting.key is None or waiting.sid is not None:
            return  # released already, or bound twice
        loop = asyncio.get_running_loop()
        waiting.sid = sid
        waiting.opened = loop.time()
        self.by_sid[sid] = waiting
        limits = self.limits
        waiting.timer = loop.call_later(min(limits.connect_s, limits.join_s), self._due, sid)

    def answered(self, sid: str, handler: Any) -> None:
        """The long-polling handshake that made session `sid` is answered: python-socketio
        keeps its environ for the session's life, and there the handler (with its request,
        headers, connection and stream: ~5 KB) is only read for the client's address."""
        if self.on_answered is not None:
            self.on_answered(sid, handler)

    def connecting(self, sid: str) -> None:
        """The session sent a Socket.IO CONNECT: it has until `join_s` from its handshake."""
        waiting = self.by_sid.get(sid)
        if waiting is None or waiting.connecting:
            return
        waiting.connecting = True
        if self.limits.join_s > self.limits.connect_s:
            waiting.timer.cancel()
            waiting.timer = asyncio.get_running_loop().call_at(
                waiting.opened + self.limits.join_s, self._due, sid)

    def joined(self, sid: str) -> None:
        """The session is on /events: it no longer counts."""
        self.ended(sid)

    def ended(self, sid: str) -> None:
        waiting = self.by_sid.pop(sid, None)
        if waiting is not None:
            waiting.timer.cancel()
            self._uncount(waiting)

    def waiting(self, sid: str) -> bool:
        """True while `sid` is within its deadlines and not on /events."""
        return sid in self.by_sid

    def _due(self, sid: str) -> None:
        waiting = self.by_sid.pop(sid, None)
        if waiting is None:
            return
        self._uncount(waiting)
        if self.expire is None:
            return
        # Sessions made in a burst are due in a burst: ended a batch per turn of the loop, so
        # that requests in between are not kept waiting behind thousands of them.
        self._expiring.append((sid, waiting.connecting))
        if len(self._expiring) == 1:
            asyncio.get_running_loop().call_soon(self._expire_some)

    def _expire_some(self) -> None:
        expiring = self._expiring
        limits = self.limits
        for _ in range(min(len(expiring), EXPIRY_BATCH)):
            sid, connecting = expiring.popleft()
            if connecting:
                why = f"not on /events after {limits.join_s:g} s"
            else:
                why = f"no Socket.IO CONNECT within {min(limits.connect_s, limits.join_s):g} s"
            try:
                self.expire(sid, why)
            except Exception:
                log.exception("ending an Engine.IO session failed")
        if expiring:
            asyncio.get_running_loop().call_soon(self._expire_some)

    def _uncount(self, waiting: Waiting) -> None:
        key, waiting.key = waiting.key, None
        if key is None:
            return
        self.count -= 1
        held = self.by_address.get(key, 0) - 1
        if held > 0:
            self.by_address[key] = held
        else:
            self.by_address.pop(key, None)


class Answered:
    """What stays of an answered handshake's handler in its session's environ: the address
    log lines and the gateway read (`environ["tornado.handler"].request.remote_ip`)."""

    __slots__ = ("request",)

    def __init__(self, handler: Any) -> None:
        self.request = _Peer(handler.request.remote_ip)


class _Peer:
    __slots__ = ("remote_ip",)

    def __init__(self, remote_ip: str | None) -> None:
        self.remote_ip = remote_ip


def end(eio: Any, sid: str) -> None:
    """Let go of an ending session (python-engineio's `disconnect` event for it has fired):
    its queue's reference to it (a cycle: the session holds the queue), a long-poll waiting on
    it, and the engine server's entry, once its close has run (the CLOSE packet for a long-poll is queued by
    then; a poll that comes later is answered as for any unknown session)."""
    session = eio.sockets.get(sid)
    if session is None:
        return
    queue = session.queue
    if getattr(queue, "session", None) is session:
        queue.session = None
    if getattr(queue, "transport", None) is None:
        # A long-poll still waiting (its client closed the session from another request) is
        # answered now, not at its timeout: it holds its request, stream and the session.
        queue.put_nowait(None)
    asyncio.get_running_loop().call_soon(_forget, eio, sid, session)


def _forget(eio: Any, sid: str, session: Any) -> None:
    if eio.sockets.get(sid) is session and (session.closed or session.closing):
        del eio.sockets[sid]


def admitting(base: type, sessions: AnonSessions) -> type:
    """The Socket.IO endpoint's handler class (a subclass of droid.realtime.guard's, whose
    `prepare` refuses origins first), admitting handshakes against `sessions`."""

    refused_log = Summary("refused a Socket.IO handshake from %s: %s",
                          "refused %d Socket.IO handshakes in %.0f s (the last from %s: %s)")

    class Handler(base):  # type: ignore[misc, valid-type]
        admission: Waiting | None = None
        serving = False

        async def prepare(self) -> None:
            await super().prepare()
            if self.answered or self.request.method != "GET" or \
                    self.get_query_argument("sid", None) is not None:
                return
            try:
                self.admission = sessions.admit(self.request.remote_ip)
            except Refused as refused:
                refused_log(self.request.remote_ip, refused.message)
                write_error(self, refused.status, refused.message, retry_after=RETRY_AFTER_S)

        async def get(self, *args: Any, **kwargs: Any) -> None:
            waiting = self.admission
            self.serving = True
            try:
                await super().get(*args, **kwargs)
            finally:
                self._admitted()
                if waiting is not None and waiting.sid is not None and \
                        getattr(self, "websocket", None) is None:
                    sessions.answered(waiting.sid, self)  # even when its client is gone

        def on_connection_close(self) -> None:
            if not self.serving:  # get() never ran: nothing else will let go of the count
                self._admitted()
            super().on_connection_close()

        def _admitted(self) -> None:
            # The request is over (a WebSocket: its handshake answered): a session was made of
            # it, or never will.
            if self.admission is not None:
                sessions.release(self.admission)
                self.admission = None

    return Handler


class Summary:
    """One kind of event in the log: the first at once, then at most a line every `every`
    seconds saying how many came meanwhile (a flood is a line every 10 s, not one per event).
    `first` and `many` are %-formats; `many` gets the count and the seconds first, then the
    arguments of the last event."""

    def __init__(self, first: str, many: str, every: float = 10.0) -> None:
        self.first, self.many, self.every = first, many, every
        self.last = -every
        self.since = 0
        self.args: tuple = ()
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, *args: Any) -> None:
        now = time.monotonic()
        if self.since == 0 and now - self.last >= self.every:
            self.last = now
            log.info(self.first, *args)
            return
        self.since += 1
        self.args = args
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, self.last + self.every - now), self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = time.monotonic()
        log.info(self.many, self.since, now - self.last, *self.args)
        self.last, self.since = now, 0
