"""Droid's Engine.IO server: python-engineio's AsyncServer with Droid's WebSocket transport
(droid/realtime/transport.py), a ping wheel instead of a task per session (pings.py), and a
SessionQueue per session (the slow-consumer bound). Its hooks into python-engineio are
droid/realtime/adapter.py's."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from . import adapter
from .environ import translate_request
from .pings import PingWheel
from .transport import Bound, SessionQueue, Transport

log = logging.getLogger("droid.transport")


class _Opener:
    """What a session calls to serve a WebSocket request (the driver's `websocket` entry), once
    python-engineio has accepted it: answers the handshake (droid/realtime/handler.py), attaches
    a Transport to the WebSocket and returns, so that no task stays behind."""

    __slots__ = ("socket", "server")

    def __init__(self, handler: Any, server: "TransportServer") -> None:
        self.socket = adapter.EngineServerBase.session_of(handler)
        self.server = server

    async def __call__(self, environ: dict) -> None:
        handler = environ.get("tornado.handler")
        if handler is None or not hasattr(handler, "accept_websocket"):
            return None
        sock = self.socket
        if sock.upgrading or self.server.ws_transports.get(sock.sid) is not None:
            # One upgrade at a time, as Node's engine.io: a second WebSocket for a session
            # would take it over from the first (and from whoever opened that one). Refused
            # before its handshake is answered: a 400 in the error shape.
            log.info("refused a second WebSocket for one Engine.IO session, from %s",
                     environ.get("REMOTE_ADDR", "?"))
            return None
        accepted = await handler.accept_websocket(self.server.max_http_buffer_size)
        # python-socketio keeps this environ for the socket's life (a direct WebSocket's is the
        # handshake's): what only the handshake needed goes, the handler above all (its request,
        # headers and connection would otherwise live as long as the socket).
        kept = {key: environ[key] for key in _KEPT if key in environ}
        environ.clear()
        environ.update(kept)
        if accepted is None:  # the client left during the handshake
            return None
        ws, leftover = accepted
        transport = Transport(self.server, sock, ws)
        transport.attach()
        ws.start(transport, leftover)
        return None


# What of a WebSocket session's environ is read after the handshake (by python-socketio, the
# gateway and its log lines).
_KEPT = ("REQUEST_METHOD", "QUERY_STRING", "PATH_INFO", "REMOTE_ADDR", "HTTP_HOST",
         "HTTP_ORIGIN", "HTTP_USER_AGENT", "HTTP_AUTHORIZATION", "wsgi.url_scheme")


class TransportServer(adapter.EngineServerBase):
    """python-engineio's server with Droid's WebSocket transport, ping wheel and session
    queues (`bound`: the slow-consumer bound every session's queue applies)."""

    websocket_opener = _Opener
    translate_request = staticmethod(translate_request)

    def __init__(self, *args: Any, bound: Bound = Bound(), **kwargs: Any) -> None:
        self.bound = bound
        super().__init__(*args, **kwargs)
        self.ws_transports: dict[str, Transport] = {}  # every attached WebSocket, by session
        # asked at each ping whether the session is still wanted (GuardedServer: on /events,
        # or within its deadline to join); one that is not is ended
        self.wanted: Callable[[str], bool] | None = None
        self.wheel = PingWheel(self)
        self._ending: set[asyncio.Task] = set()

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return super().create_queue(*args, **kwargs)
        return SessionQueue(self.bound)

    def ping_later(self, session: Any) -> None:
        self.wheel.ping_later(session)

    async def end_session(self, sock: Any, reason: Any, *, abort: bool = True) -> None:
        """End an Engine.IO session and forget it, never waiting for its client. With `abort`
        (its transport is gone) no CLOSE packet is sent; without, one is queued, so that a
        long-poll waiting meanwhile is answered with it."""
        if not sock.closed:
            try:
                await sock.close(wait=False, abort=abort, reason=reason)
            except Exception:  # closed meanwhile
                log.debug("closing Engine.IO session %s failed", sock.sid, exc_info=True)
        if self.sockets.get(sock.sid) is sock:
            del self.sockets[sock.sid]

    def end_session_soon(self, sock: Any, reason: Any = None, *, abort: bool = False) -> None:
        """end_session from code that cannot wait."""
        task = asyncio.get_running_loop().create_task(
            self.end_session(sock, reason or self.reason.TRANSPORT_ERROR, abort=abort))
        self._ending.add(task)  # keep a reference until it is done
        task.add_done_callback(self._ending.discard)

    def session(self, sid: str | None) -> Any:
        """The Engine.IO session `sid`, or None."""
        return self.sockets.get(sid) if sid else None

    def transport(self, sid: str) -> Transport | None:
        return self.ws_transports.get(sid)
