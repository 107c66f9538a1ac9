"""Droid's Engine.IO 4 WebSocket transport, driven by Tornado's callbacks.

It owns every WebSocket of the Socket.IO endpoint, whether the client opened on a WebSocket or
upgraded to one from long-polling: the Tornado handler (`tornado_handler`), the probe/upgrade
exchange on the WebSocket side, reading frames, writing packets and pre-encoded frames
(`Transport`), and closing. python-socketio still decides connect, namespaces, events and acks
(every MESSAGE goes to the session's `receive`, as python-engineio's own WebSocket loop hands
it), and python-engineio still owns the session, its queue while no WebSocket is attached
(droid/realtime/queue.py), the handshake and long-polling, including the polling side of an
upgrade. Pings are droid/realtime/pings.py's; what goes under the libraries is
droid/realtime/adapter.py's.

**Why not python-engineio's WebSocket loop**: it keeps, per socket, a read-loop task whose
`wait_for` adds a task and a timer per received frame, a writer task, a ping task sleeping 25 s,
and a Tornado handler with an asyncio receive queue; that was most of an idle socket's memory
and of a connection's cost (bench/RESULTS.md). Here:

- `on_message` hands each frame on at once: no receive queue, and no task unless its handling
  has to wait (`run_eager`).
- No writer task: a packet is written to Tornado's stream when it is sent (with nothing buffered
  yet, straight to the socket); the IOStream's own write handler, registered only while bytes
  wait, is the writer that exists only while packets wait. Packets sent before the WebSocket is
  live (the OPEN packet, anything sent while an upgrade is probed) wait in the session's queue
  and are written, in order, when it is.
- After `open()`, the handler drops what Tornado keeps for the request's sake: `_SlimRequest`
  keeps what logging and the gateway read.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import tornado.websocket
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from tornado.iostream import SSLIOStream, StreamClosedError

from . import adapter
from .eager import run_eager, spawn_logged
from .pings import PingWheel
from .queue import Bound, SessionQueue
from .environ import translate_request
from .wire import Frames, frame_refusal, ws_frame

log = logging.getLogger("droid.transport")

PROBING, UPGRADING, OPEN, CLOSED = "probing", "upgrading", "open", "closed"
# Nagle's algorithm off on every WebSocket, as Node's servers do: the handshake and each event are
# small writes that must not wait for the peer's (delayed) acknowledgement of the previous one.
NODELAY = True


class Transport:
    """One Engine.IO session's WebSocket."""

    __slots__ = ("server", "socket", "handler", "conn", "stream", "state", "raw", "_closing")

    def __init__(self, server: "TransportServer", socket: Any, handler: Any) -> None:
        self.server = server
        self.socket = socket
        self.handler = handler
        self.conn = handler.ws_connection
        self.stream = self.conn.stream
        self.state = OPEN
        # frames built here go straight to the stream; with per-message deflate negotiated
        # Tornado must compress them
        self.raw = not adapter.deflating(self.conn)
        self._closing = False

    @property
    def live(self) -> bool:
        return self.state is OPEN and not self._closing

    # opening

    def attach(self) -> None:
        if NODELAY:
            try:
                self.stream.set_nodelay(True)
            except OSError:  # closed meanwhile: on_close follows
                pass
        sock = self.socket
        self.server.ws_transports[sock.sid] = self
        self.handler.transport = self
        if sock.connected:  # opened with long-polling: this is an upgrade, probe first
            sock.upgrading = True  # python-engineio answers polls with NOOP from now on
            self.state = PROBING
        else:
            sock.connected = True
            sock.upgraded = True
            self._go_live()

    def _go_live(self) -> None:
        """Write what the session's queue holds, then take every packet as it is sent."""
        self.state = OPEN
        queue = self.socket.queue
        while queue.qsize():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is not None:
                self.send_packet(pkt)
        queue.transport = self

    # reading

    def on_message(self, message: str | bytes) -> asyncio.Future | None:
        refused = frame_refusal(message)
        if refused is not None:
            log.info("closing WebSocket from %s: %s", self._peer(), refused[1])
            self.close(*refused)
            return None
        if self.state is OPEN:
            if message == "3":  # PONG: what AsyncSocket.receive does with it, minus a coroutine
                self.socket.schedule_ping()
                return None
            kind = message[0]
            try:
                pending = run_eager(self.socket.receive(eio_packet.Packet(encoded_packet=message)))
            except eio_exceptions.UnknownPacketError:
                return None  # a PING or NOOP from the client: ignored, as python-engineio does
            except Exception as exc:
                log.info("closing WebSocket from %s: %s while handling a frame", self._peer(),
                         type(exc).__name__)
                self.close(1011)
                return None
            if kind == "1":  # CLOSE: the session is over, and so is its connection
                self.close(1000)
            return pending
        if self.state is PROBING and message == "2probe":
            self._write(b"3probe", 0x1)
            self.socket.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends a pending poll
            self.state = UPGRADING
            return None
        if self.state is UPGRADING and message == "5":
            self.socket.upgraded = True
            self.socket.upgrading = False
            self._go_live()
            return None
        if self.state in (PROBING, UPGRADING):
            log.info("closing WebSocket from %s: upgrade failed", self._peer())
            self.socket.upgrading = False
            self.close(1008)
        return None

    # writing (the session's queue calls these, and checks the slow-consumer bound)

    def send_packet(self, pkt: Any) -> None:
        """Write one Engine.IO packet."""
        data = pkt.encode()
        if isinstance(data, str):
            self._write(data.encode(), 0x1)
        else:
            self._write(data, 0x2)
        if pkt.packet_type == eio_packet.CLOSE:
            self.close(1000)

    def send_frames(self, frames: Frames) -> None:
        """Write pre-built Engine.IO MESSAGE frames (through Tornado when it must compress)."""
        if not self.live:
            return
        if self.raw:
            self._write_raw(frames.ws_bytes)
        else:
            for text in frames.texts:
                self._write(b"4" + text, 0x1)

    def _write(self, payload: bytes, opcode: int) -> None:
        if self._closing or self.state is CLOSED:
            return
        if self.raw:
            self._write_raw(ws_frame(payload, opcode))
            return
        try:
            self.conn.write_message(payload, binary=opcode == 0x2)
        except tornado.websocket.WebSocketClosedError:
            return

    def _write_raw(self, data: bytes) -> None:
        stream = self.stream
        if stream.closed() or adapter.closing(self.conn):
            return
        if not adapter.buffered(stream) and not isinstance(stream, SSLIOStream):
            # Nothing waits before it: one send(), and no Future, when the kernel takes it all.
            try:
                sent = stream.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        try:
            stream.write(data)
        except StreamClosedError:
            return

    def buffered(self) -> int:
        """Bytes written to this socket that have not reached the kernel yet."""
        return adapter.buffered(self.stream)

    # closing

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the WebSocket after what is buffered (the close handshake)."""
        if self._closing or self.state is CLOSED:
            return
        self._closing = True
        handler = self.handler
        if handler is not None and handler.ws_connection is not None:
            handler.close(code, reason)

    def abort(self) -> None:
        """Drop the connection now: no close handshake (the client is not reading, or gone)."""
        self._closing = True
        if self.stream is not None and not self.stream.closed():
            self.stream.close()

    def on_close(self) -> None:
        """Tornado says the connection is gone: end the Engine.IO session unless it continues
        over long-polling (a failed upgrade)."""
        if self.state is CLOSED:
            return
        was, self.state = self.state, CLOSED
        sock, server = self.socket, self.server
        if server.ws_transports.get(sock.sid) is self:
            del server.ws_transports[sock.sid]
        if sock.queue.transport is self:
            sock.queue.transport = None
        self.handler = self.conn = self.stream = None
        if was in (PROBING, UPGRADING):
            sock.upgrading = False
            return
        spawn_logged(server.end_session(sock, server.reason.TRANSPORT_CLOSE), "closing a session")

    def _peer(self) -> str:
        handler = self.handler
        return getattr(getattr(handler, "request", None), "remote_ip", "?")


# the engine server -----------------------------------------------------------------------------

class _Opener:
    """What a session calls to serve a WebSocket request (the driver's `websocket` entry):
    attaches a Transport and returns at once, so that no task stays behind."""

    __slots__ = ("socket", "server")

    def __init__(self, handler: Any, server: "TransportServer") -> None:
        self.socket = adapter.EngineServerBase.session_of(handler)
        self.server = server

    async def __call__(self, environ: dict) -> None:
        handler = environ["tornado.handler"]
        if getattr(handler, "ws_connection", None) is None:
            return None
        # python-socketio keeps this environ for the socket's life (a direct WebSocket's is the
        # handshake's): the request body reader and the WebSocket handshake's own headers are of
        # no use after it.
        for key in _HANDSHAKE_ONLY:
            environ.pop(key, None)
        sock = self.socket
        if sock.upgrading or self.server.ws_transports.get(sock.sid) is not None:
            # One upgrade at a time, as Node's engine.io: a second WebSocket for a session
            # would take it over from the first (and from whoever opened that one).
            log.info("refused a second WebSocket for one Engine.IO session, from %s",
                     getattr(handler.request, "remote_ip", "?"))
            return None
        Transport(self.server, sock, handler).attach()
        return None


_HANDSHAKE_ONLY = ("wsgi.input", "HTTP_SEC_WEBSOCKET_KEY", "HTTP_SEC_WEBSOCKET_VERSION",
                   "HTTP_SEC_WEBSOCKET_EXTENSIONS", "HTTP_UPGRADE", "HTTP_CONNECTION",
                   "HTTP_CACHE_CONTROL", "HTTP_PRAGMA", "HTTP_ACCEPT_ENCODING")


class TransportServer(adapter.EngineServerBase):
    """python-engineio's server with Droid's WebSocket transport, ping wheel and session
    queues (`bound`: the slow-consumer bound every session's queue applies)."""

    websocket_opener = _Opener
    translate_request = staticmethod(translate_request)

    def __init__(self, *args: Any, bound: Bound = Bound(), **kwargs: Any) -> None:
        self.bound = bound
        super().__init__(*args, **kwargs)
        self.ws_transports: dict[str, Transport] = {}
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


__all__ = ["Transport", "TransportServer", "NODELAY"]
