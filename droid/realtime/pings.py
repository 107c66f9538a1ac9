"""Every WebSocket session's next ping and ping deadline, under one timer.

python-engineio starts a task per session that sleeps the ping interval (and that task keeps a
closed session alive until it wakes); the engine server hands that job here instead (see
droid/realtime/adapter.py). A client that does not answer a ping is dropped within ping interval
+ ping timeout (+ the wheel's resolution).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from typing import Any

from engineio import packet as eio_packet

from .eager import spawn_logged

log = logging.getLogger("droid.transport")


class PingWheel:
    """Every socket's next ping and ping deadline, in buckets of `resolution` seconds under one
    timer (python-engineio starts a task per socket that sleeps the ping interval, and that task
    keeps a closed socket alive until it wakes). Entries hold their socket weakly: a closed
    session is freed at once."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.buckets: dict[int, list[tuple[weakref.ref, float | None]]] = {}
        self.cursor: int | None = None
        self.timer: asyncio.TimerHandle | None = None

    @property
    def resolution(self) -> float:
        s = self.server
        return max(0.05, min(1.0, s.ping_interval / 4, s.ping_timeout / 4))

    def _add(self, when: float, entry: tuple[weakref.ref, float | None]) -> None:
        res = self.resolution
        tick = math.ceil(when / res)
        self.buckets.setdefault(tick, []).append(entry)
        if self.cursor is None or tick < self.cursor:
            self.cursor = tick
            if self.timer is not None:  # due before what the timer waits for
                self.timer.cancel()
                self.timer = None
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(self.cursor * res, self._tick)

    def ping_later(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._add(loop.time() + self.server.ping_interval, (weakref.ref(sock), None))

    def _tick(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        res = self.resolution
        now = math.floor((loop.time() + 0.001) / res)  # call_at may run a hair early
        tick = self.cursor if self.cursor is not None else now
        while tick <= now:
            for ref, stamp in self.buckets.pop(tick, ()):
                sock = ref()
                if sock is None:
                    continue  # the session is over and gone
                try:
                    self._due(sock, stamp)
                except Exception:
                    log.exception("ping of %s failed", sock.sid)
            tick += 1
        self.cursor = min(self.buckets) if self.buckets else None
        if self.cursor is not None:
            self.timer = loop.call_at(max(self.cursor * res, loop.time()), self._tick)

    def _due(self, sock: Any, stamp: float | None) -> None:
        server = self.server
        transport = server.ws_transports.get(sock.sid)
        if transport is not None and transport.socket is not sock:
            transport = None
        if sock.closed or sock.closing:
            if transport is not None:
                transport.close(1000)  # a session ended without a CLOSE packet
            return
        if stamp is None:  # time to ping
            wanted = server.wanted
            if wanted is not None and not wanted(sock.sid):
                log.info("ending an Engine.IO session that is not on /events any more")
                if transport is not None:
                    transport.close(1000)
                spawn_logged(server.end_session(sock, server.reason.SERVER_DISCONNECT,
                                                abort=False), "ending a session")
                return
            sock.last_ping = stamp = time.time()
            spawn_logged(sock.send(eio_packet.Packet(eio_packet.PING)), "a ping")
            self._add(asyncio.get_running_loop().time() + server.ping_timeout,
                      (weakref.ref(sock), stamp))
        elif sock.last_ping == stamp:
            log.info("%s: no answer to a ping within %g s: closing", sock.sid,
                     server.ping_timeout)
            if transport is not None:
                transport.abort()  # half-open or stalled: no close handshake to wait for
            spawn_logged(server.end_session(sock, server.reason.PING_TIMEOUT), "a ping timeout")
