"""What reaches python-engineio and python-socketio is checked first: origins, and malformed
Engine.IO and Socket.IO traffic, refused at the door, quietly and for good.

python-socketio 5.18 and python-engineio 4.15 trust their clients more than a public service can
(tests/test_raw_packets.py shows each case): a packet that does not decode or dispatch logs a full
traceback, once per packet; a BINARY_EVENT announcing millions of attachments makes
python-socketio buffer every later frame; a list as event name fails in a background task.
Droid has no binary events and needs nothing but the four client packet types (CONNECT,
DISCONNECT, EVENT, ACK), so anything else closes the connection with one log line. WebSocket
frames are checked by the transport itself (`wire.frame_refusal`); here:

- `endpoint_handler(handler_class, eio, origins)`: the Socket.IO endpoint's Tornado handler,
  which refuses a browser origin the CORS rule (droid/web.py) does not allow, before
  python-engineio or Tornado's WebSocket code sees the request (one WARNING line with the
  origin, a 403 in the error shape, both transports), and answers every long-polling POST,
  whatever it carries: a body over `max_http_buffer_size` (python-engineio would end the
  session and then wait, inside the POST, for a poll to take the CLOSE packet: the POST was never
  answered) gets a 413, a payload python-engineio cannot take a 400, both in the error shape,
  and the session ends at once. python-engineio is given the same origin rule through its
  documented callable form of `cors_allowed_origins`, so it never refuses on its own (it would
  log at ERROR, twice) and still writes the CORS headers of the requests it serves.
- `GuardedServer`: python-socketio's AsyncServer that refuses binary data, undecodable packets,
  and EVENTs that are not a list starting with an event name, turns any exception of the
  dispatch into a disconnect, tells the sessions not on /events (droid/realtime/sessions.py) when
  each session opens, sends a CONNECT, joins /events and ends (ending those past their
  deadlines), and lets a connect handler have work run right after its CONNECT answer is
  written (`after_connect`). Its hooks into python-socketio are droid/realtime/adapter.py's.
"""
from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, Callable, Coroutine, Mapping

import tornado.web
from socketio import packet as sio_packet

from ..errors import Invalid
from ..web import BoundedBody, Origins, write_error
from .adapter import SocketIOServerBase
from .eager import spawn_logged
from .engine import TransportServer
from .sessions import Answered, AnonSessions, SessionLimits, Summary
from .sessions import end as end_session
from .transport import Bound
from .wire import CLIENT_SOCKETIO_PACKETS, NAMESPACE, POLLING_ENGINE_PACKETS

log = logging.getLogger("droid.guard")
cors_log = logging.getLogger("droid.cors")

# What the connect handler running in this context asked to run once its CONNECT answer is out.
_after_connect: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "droid_after_connect", default=None)
_MAX_PAYLOAD_PACKETS = 16  # python-engineio's own limit (Payload.max_decode_packets)


def refusal(data: Any) -> str | None:
    """Why a Socket.IO packet (the text of an Engine.IO MESSAGE) is refused, or None."""
    if not isinstance(data, str):
        return "binary data"
    if not data or data[0] not in CLIENT_SOCKETIO_PACKETS:
        return "not a client packet type"
    return None


def payload_refusal(body: bytes) -> str | None:
    """Why the body of a long-polling POST is refused, or None. python-engineio answers a packet
    type it does not take there (PING, NOOP) by closing the session and waiting, inside the POST,
    for a poll that takes the CLOSE packet: without a poll, the POST was never answered."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if not text:
        return None
    packets = text.split("\x1e")
    if len(packets) > _MAX_PAYLOAD_PACKETS:
        return "too many packets"
    for packet in packets:
        if not packet or packet[0] not in POLLING_ENGINE_PACKETS:
            return "not an Engine.IO client packet"
        if packet[0] == "4" and refusal(packet[1:]) is not None:
            return "not a Socket.IO client packet"
    return None


def engineio_origins(origins: Origins) -> str | Callable[[str, Mapping[str, Any]], bool]:
    """The value of python-engineio's `cors_allowed_origins` for the CORS rule."""
    if origins.any:
        return "*"

    def allowed(origin: str, environ: Mapping[str, Any]) -> bool:
        return origins.allows(origin, environ.get("HTTP_HOST"))
    return allowed


def endpoint_handler(base: type, eio: TransportServer, origins: Origins) -> type:
    """A subclass of the Socket.IO endpoint's Tornado handler (see the module docstring). The
    body of a POST is streamed (BoundedBody) so that an oversized one is never held."""

    @tornado.web.stream_request_body
    class Handler(BoundedBody, base):  # type: ignore[misc, valid-type]
        body_limit = eio.max_http_buffer_size

        async def prepare(self) -> None:
            origin = self.request.headers.get("Origin")
            if origin is not None and not origins.allows(origin,
                                                         self.request.headers.get("Host")):
                websocket = self.request.headers.get("Upgrade", "").lower() == "websocket"
                # repr() and a cut: the header is the client's, and so is this log line.
                cors_log.warning("refused a Socket.IO %s request from origin %r "
                                 "(not in CORS_ORIGIN)",
                                 "WebSocket" if websocket else "long-polling", origin[:200])
                write_error(self, 403, "Origin not allowed")
                return
            if self.request.method == "POST":
                try:
                    self.start_body()
                except Invalid as exc:  # a Content-Length that is not a number
                    write_error(self, 400, str(exc.message))

        def body_too_large(self) -> None:
            log.info("long-polling POST from %s over %d bytes: ending its session",
                     self.request.remote_ip, self.body_limit)
            session = eio.session(self.get_query_argument("sid", None))
            if session is not None:
                eio.end_session_soon(session)

        async def post(self, *args: Any, **kwargs: Any) -> None:
            body = self.take_body()
            why = payload_refusal(body)
            if why is not None:
                log.info("long-polling POST from %s refused (%s): ending its session",
                         self.request.remote_ip, why)
                session = eio.session(self.get_query_argument("sid", None))
                if session is not None:
                    await eio.end_session(session, eio.reason.TRANSPORT_ERROR, abort=False)
                write_error(self, 400, "Malformed Engine.IO payload")
                return
            self.request.body = body
            await super().post(*args, **kwargs)

    return Handler


class GuardedServer(SocketIOServerBase):
    """An AsyncServer on Droid's transport that disconnects a client sending a packet it cannot
    take. `bound` is the slow-consumer bound of every session (droid/realtime/queue.py)."""

    eio: TransportServer

    def __init__(self, *args: Any, bound: Bound = Bound(),
                 sessions: AnonSessions | None = None, **kwargs: Any) -> None:
        self._bound = bound  # read by engine_class, during __init__
        # python-engineio's service task walks a copy of every session's list, holding ended
        # ones for up to ping_timeout; the ping wheel does its work (droid/realtime/sessions.py)
        kwargs.setdefault("monitor_clients", False)
        super().__init__(*args, **kwargs)
        self.sessions = sessions or AnonSessions(SessionLimits())
        self.sessions.expire = self._expire
        self.sessions.on_answered = self._answered
        self._expired_log = Summary("ended an Engine.IO session from %s: %s",
                                    "ended %d Engine.IO sessions in %.0f s (the last from %s: %s)")
        self.eio.wanted = self._wanted

    def engine_class(self) -> Any:
        return functools.partial(TransportServer, bound=self._bound)

    def after_connect(self, coro: Coroutine) -> bool:
        """From a connect handler: run `coro` as soon as python-socketio has written this
        connection's CONNECT answer, in the same turn of the event loop (a task would start
        only on the next turn, which in a connection storm is milliseconds later, while the
        client waits). It runs up to its first real wait at once, the rest in a task; failures
        are logged. False, and `coro` left alone, when not called from a connect handler. If
        the connection is refused after all, `coro` is closed without running."""
        pending = _after_connect.get()
        if pending is None:
            return False
        pending.append(coro)
        return True

    async def around_connect(self, eio_sid: str, namespace: str | None,
                             run: Callable[[], Coroutine]) -> None:
        pending: list = []
        token = _after_connect.set(pending)
        try:
            await run()
        finally:
            _after_connect.reset(token)
            # (timers made meanwhile copied this context: it must not keep the coroutines)
            pending, held = list(pending), pending
            held.clear()
            namespace = namespace or "/"
            sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
            accepted = sid is not None and self.manager.is_connected(sid, namespace)
            if accepted and namespace == NAMESPACE:
                self.sessions.joined(eio_sid)
            for coro in pending:
                if accepted:
                    spawn_logged(coro, "after connecting")
                else:
                    coro.close()

    def on_session(self, eio_sid: str) -> None:
        session = self.eio.session(eio_sid)
        if session is not None:
            session.queue.session = session  # the queue sheds its own session
        environ = self.environ.get(eio_sid) or {}
        handler = environ.get("tornado.handler")
        self.sessions.opened(getattr(handler, "admission", None), eio_sid)

    def _answered(self, eio_sid: str, handler: Any) -> None:
        environ = self.environ.get(eio_sid)
        if environ is not None and environ.get("tornado.handler") is handler:
            environ["tornado.handler"] = Answered(handler)

    def on_session_end(self, eio_sid: str) -> None:
        self.sessions.ended(eio_sid)
        end_session(self.eio, eio_sid)

    def _wanted(self, eio_sid: str) -> bool:
        """Asked at each ping: a session not on /events past its deadlines (it left) ends."""
        return self.sessions.waiting(eio_sid) or \
            self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is not None

    def _expire(self, eio_sid: str, why: str) -> None:
        session = self.eio.session(eio_sid)
        if session is None:
            return
        self._expired_log(_address(self.environ.get(eio_sid)), why)
        self._close_transport(eio_sid)
        spawn_logged(self.eio.end_session(session, self.eio.reason.TRANSPORT_ERROR,
                                          abort=False), "ending a session")

    async def on_packet(self, eio_sid: str, data: Any,
                        handle: Callable[[str, Any], Coroutine]) -> None:
        if data[:1] == "0":  # a CONNECT (refused below if it is not one)
            self.sessions.connecting(eio_sid)
        why = refusal(data)
        if why is None:
            try:
                pkt = self.packet_class(encoded_packet=data)
            except Exception:
                why = "undecodable packet"
            else:
                if pkt.packet_type == sio_packet.EVENT and not (
                        isinstance(pkt.data, list) and pkt.data and isinstance(pkt.data[0], str)):
                    why = "an EVENT without an event name"
        if why is None:
            try:
                await handle(eio_sid, data)
                return
            except Exception as exc:
                why = f"{type(exc).__name__} while handling it"
        log.info("disconnecting client %s: malformed packet (%s)", eio_sid, why)
        self._close_transport(eio_sid)
        # Not eio.disconnect(): on long-polling it waits for a poll that takes the CLOSE packet,
        # and this runs inside the client's POST, which would then never be answered.
        session = self.eio.session(eio_sid)
        if session is not None:
            await self.eio.end_session(session, self.eio.reason.TRANSPORT_ERROR,
                                       abort=False)

    def _close_transport(self, eio_sid: str) -> None:
        # Ending the Engine.IO session alone would leave its WebSocket open until the ping
        # timeout.
        transport = self.eio.transport(eio_sid)
        if transport is not None:
            transport.close(1008)


def _address(environ: dict | None) -> str:
    return (environ or {}).get("REMOTE_ADDR") or "?"  # the client's (droid/realtime/environ.py)
