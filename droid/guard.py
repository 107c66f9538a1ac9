"""Malformed Engine.IO and Socket.IO traffic is refused at the door, quietly and for good.

python-socketio 5.18 and python-engineio 4.15 trust their clients more than a public service can
(tests/test_raw_packets.py shows each case): a frame that does not decode escapes python-engineio's
WebSocket reader and leaves a half-dead socket counted for a minute; a packet that does not decode
or dispatch logs a full traceback, once per packet; a BINARY_EVENT announcing millions of
attachments makes python-socketio buffer every later frame; a list as event name fails in a
background task. Droid has no binary events and needs nothing but the four client packet types
(CONNECT, DISCONNECT, EVENT, ACK), so anything else closes the connection with one log line:

- `guard_frames(handler_class)`: on the WebSocket, before python-engineio reads a frame: binary
  frames, text frames that are not an Engine.IO packet type 1-6, and Socket.IO packets other than
  0-3 close the connection (1003 / 1008). After an Engine.IO CLOSE the connection is closed too
  (python-engineio ends the session but would leave the WebSocket open until its ping timeout).
- `guard_polling(handler_class, eio)`: long-polling POSTs are answered whatever they carry. A
  body over `max_http_buffer_size` (python-engineio would end the session and then wait, inside
  the POST, for a poll to take the CLOSE packet: the POST was never answered) gets a 413, a
  payload python-engineio cannot take a 400, both in the JSON error shape, and the session ends
  at once. Sessions are always ended without waiting for the client (`end_session`).
- `GuardedServer`: python-socketio's AsyncServer, whose `_handle_eio_message` (the one entry of
  every Socket.IO packet, long-polling included) refuses binary data, undecodable packets, and
  EVENTs that are not a list starting with an event name, and turns any exception of the
  dispatch into a disconnect, and ends an Engine.IO session that has not joined /events within
  `connect_timeout_s` (45 s, socket.io's connectTimeout). It overrides private methods of
  python-socketio: setup.cfg pins python-socketio below 6. Being Droid's one AsyncServer
  subclass, it is also where python-engineio is given its server class:
  `transport.TransportServer` (Droid's WebSocket transport, which applies
  `transport.frame_refusal` to every frame itself) when `transport=True`, else
  `delivery.EngineServer` (python-engineio's own WebSocket loop, lean per-socket queues).
  `after_connect` lets a connect handler have work run right after its CONNECT answer is
  written (the gateway's `connected`), in the same turn of the loop rather than in a task.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Callable, Coroutine

import socketio
import tornado.web
from socketio import packet as sio_packet

from .delivery import EngineServer
from .errors import Invalid
from .events import NAMESPACE
from .handlers.base import BoundedBody
from .transport import TransportServer, frame_refusal, spawn_logged
from .util import dumps

log = logging.getLogger("droid.guard")

_CLIENT_PACKETS = frozenset("0123")  # CONNECT, DISCONNECT, EVENT, ACK
# What the connect handler running in this context asked to run once its CONNECT answer is out.
_after_connect: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "droid_after_connect", default=None)


def refusal(data: Any) -> str | None:
    """Why a Socket.IO packet (the text of an Engine.IO MESSAGE) is refused, or None."""
    if not isinstance(data, str):
        return "binary data"
    if not data or data[0] not in _CLIENT_PACKETS:
        return "not a client packet type"
    return None


_POLLING_PACKETS = frozenset("1345")  # CLOSE, PONG, MESSAGE, UPGRADE: what engineio takes there
_MAX_PAYLOAD_PACKETS = 16  # python-engineio's own limit (Payload.max_decode_packets)


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
        if not packet or packet[0] not in _POLLING_PACKETS:
            return "not an Engine.IO client packet"
        if packet[0] == "4" and refusal(packet[1:]) is not None:
            return "not a Socket.IO client packet"
    return None


async def end_session(eio: Any, sid: str | None) -> None:
    """End an Engine.IO session without waiting for its client: a CLOSE packet is queued for a
    poll that may never come (python-engineio's `disconnect` waits for it)."""
    sock = eio.sockets.get(sid) if sid else None
    if sock is None:
        return
    try:
        await sock.close(wait=False)
    except Exception:  # closed meanwhile
        log.debug("closing Engine.IO session %s failed", sid, exc_info=True)
    eio.sockets.pop(sid, None)


def guard_polling(base: type, eio: Any) -> type:
    """A subclass of the Socket.IO endpoint's Tornado handler whose long-polling POSTs are
    always answered, in the JSON error shape when refused: a body over python-engineio's
    `max_http_buffer_size` (Content-Length or chunked) gets a 413, a malformed payload a 400,
    and either ends the Engine.IO session at once. The body is streamed (BoundedBody) so that
    an oversized one is never held."""

    @tornado.web.stream_request_body
    class Handler(BoundedBody, base):  # type: ignore[misc, valid-type]
        body_limit = eio.max_http_buffer_size

        async def prepare(self) -> None:
            result = super().prepare()
            if result is not None:
                await result
            if self.request.method == "POST" and not self._finished:
                try:
                    self.start_body()
                except Invalid as exc:  # a Content-Length that is not a number
                    self._answer(400, "Bad Request", str(exc.message))

        def body_too_large(self) -> None:
            log.info("long-polling POST from %s over %d bytes: ending its session",
                     self.request.remote_ip, self.body_limit)
            self._end(self.get_query_argument("sid", None))

        def refuse_body(self) -> None:
            self._answer(413, "Payload Too Large",
                         f"Request body is larger than {self.body_limit} bytes")

        async def post(self, *args: Any, **kwargs: Any) -> None:
            body = self.take_body()
            why = payload_refusal(body)
            if why is not None:
                sid = self.get_query_argument("sid", None)
                log.info("long-polling POST from %s refused (%s): ending its session",
                         self.request.remote_ip, why)
                await end_session(eio, sid)
                self._answer(400, "Bad Request", "Malformed Engine.IO payload")
                return
            self.request.body = body
            await super().post(*args, **kwargs)

        def _end(self, sid: str | None) -> None:
            task = asyncio.get_running_loop().create_task(end_session(eio, sid))
            _ending.add(task)  # keep a reference until it is done
            task.add_done_callback(_ending.discard)

        def _answer(self, status: int, error: str, message: str) -> None:
            self.set_status(status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.finish(dumps({"statusCode": status, "error": error, "message": message}))

        def on_connection_close(self) -> None:
            super().on_connection_close()
            if self._chunks is not None or self._oversized:  # a POST whose body was streaming
                # WebSocketHandler's on_connection_close does not end the wait for the rest of
                # a streamed body; RequestHandler's does.
                tornado.web.RequestHandler.on_connection_close(self)

    return Handler


_ending: set = set()


def guard_frames(base: type) -> type:
    """A subclass of python-engineio's Tornado handler that closes the WebSocket on a frame no
    Engine.IO 4 client sends."""

    class Handler(base):  # type: ignore[misc, valid-type]
        async def on_message(self, message: str | bytes) -> Any:
            refused = frame_refusal(message)
            if refused is not None:
                return self._refuse(*refused)
            result = await super().on_message(message)
            if message[:1] == "1":  # CLOSE: the session is over; so is its connection
                self.close(1000)
            return result

        def _refuse(self, code: int, why: str) -> None:
            log.info("closing WebSocket from %s: %s", self.request.remote_ip, why)
            self.close(code, why)

    return Handler


class GuardedServer(socketio.AsyncServer):
    """An AsyncServer that disconnects a client sending a packet it cannot take."""

    # Set when wiring the app: closes the client's WebSocket, if it has one (ending the
    # Engine.IO session alone leaves it open until the ping timeout).
    close_transport: Callable[[str], None] | None = None
    # socket.io's connectTimeout: an Engine.IO session that has not joined /events by then is
    # ended; it would otherwise live for as long as its client answers pings.
    connect_timeout_s = 45.0

    def __init__(self, *args: Any, transport: bool = False, **kwargs: Any) -> None:
        self._droid_transport = transport  # read by _engineio_server_class, during __init__
        super().__init__(*args, **kwargs)

    def _engineio_server_class(self) -> type:
        return TransportServer if self._droid_transport else EngineServer

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

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        pending: list = []
        token = _after_connect.set(pending)
        try:
            await super()._handle_connect(eio_sid, namespace, data)
        finally:
            _after_connect.reset(token)
            if pending:
                namespace = namespace or "/"
                sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
                accepted = sid is not None and self.manager.is_connected(sid, namespace)
                for coro in pending:
                    if accepted:
                        spawn_logged(coro, "after connecting")
                    else:
                        coro.close()

    async def _handle_eio_connect(self, eio_sid: str, environ: dict) -> Any:
        result = await super()._handle_eio_connect(eio_sid, environ)
        asyncio.get_running_loop().call_later(self.connect_timeout_s, self._connect_deadline,
                                              eio_sid)
        return result

    def _connect_deadline(self, eio_sid: str) -> None:
        if eio_sid not in self.eio.sockets or \
                self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is not None:
            return
        log.info("ending Engine.IO session %s: not on %s after %g s", eio_sid, NAMESPACE,
                 self.connect_timeout_s)
        if self.close_transport is not None:
            self.close_transport(eio_sid)
        task = asyncio.get_running_loop().create_task(end_session(self.eio, eio_sid))
        _ending.add(task)  # keep a reference until it is done
        task.add_done_callback(_ending.discard)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
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
                await super()._handle_eio_message(eio_sid, data)
                return
            except Exception as exc:
                why = f"{type(exc).__name__} while handling it"
        await self._refuse(eio_sid, why)

    async def _refuse(self, eio_sid: str, why: str) -> None:
        log.info("disconnecting client %s: malformed packet (%s)", eio_sid, why)
        if self.close_transport is not None:
            self.close_transport(eio_sid)
        # Not eio.disconnect(): on long-polling it waits for a poll that takes the CLOSE packet,
        # and this runs inside the client's POST, which would then never be answered.
        await end_session(self.eio, eio_sid)
