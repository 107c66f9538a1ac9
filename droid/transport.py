"""Droid's Engine.IO 4 WebSocket transport, driven by Tornado's callbacks.

It owns every WebSocket of the Socket.IO endpoint, whether the client opened on a WebSocket or
upgraded to one from long-polling: the Tornado handler (`tornado_handler`), the probe/upgrade
exchange on the WebSocket side, reading frames, writing packets and pre-encoded frames
(`Transport`), pings and ping deadlines (`PingWheel`), the slow-consumer bound on what Tornado
buffers, and closing. python-socketio still decides connect, namespaces, events and acks (every
MESSAGE goes to `AsyncSocket.receive`, as python-engineio's own WebSocket loop hands it), and
python-engineio still owns the session (`AsyncSocket`, its queue while no WebSocket is attached),
the handshake and long-polling, including the polling side of an upgrade.

**Why it goes under python-engineio** (4.15, pinned below 5 in setup.cfg): its WebSocket loop
keeps, per socket, a read-loop task whose `wait_for` adds a task and a timer per received frame,
a writer task, a ping task sleeping 25 s, and a Tornado handler with an asyncio receive queue;
that was most of an idle socket's memory and of a connection's cost (bench/RESULTS.md). Here:

- `on_message` hands each frame on at once: no receive queue, and no task unless its handling
  has to wait (`run_eager`: a PONG, or an EVENT that python-socketio runs in its own task, costs
  none; a CONNECT that reads the store gets one, which Tornado awaits before the next frame, so
  frames are still handled in order).
- No writer task: a packet is written to Tornado's stream when it is sent (with nothing buffered
  yet, straight to the socket); the IOStream's own write handler, registered only while bytes
  wait, is the writer that exists only while packets wait. Packets sent before the WebSocket is
  attached (the OPEN packet, anything sent while an upgrade is probed) wait in python-engineio's
  queue and are written, in order, when it is.
- One `PingWheel` for every socket's ping and ping deadline instead of a task per socket
  (python-engineio starts its ping task through `start_background_task`, its public hook: the
  engine server catches that one target). A client that does not answer a ping is dropped within
  ping interval + ping timeout (+ the wheel's resolution).
- After `open()`, the handler drops what Tornado keeps for the request's sake (the request and
  its headers, the UI namespace, response headers): `_SlimRequest` keeps what logging and
  `events._peer` read.

Hooks used: `create_queue` and `start_background_task` (public), the `websocket` and
`translate_request` entries of the driver table (private; the first is what
`AsyncSocket._upgrade_websocket` calls, the second builds every request's environ, here without
a class object per request), `AsyncSocket` attributes
(`connected`, `upgrading`, `upgraded`, `closed`, `last_ping`, `queue`), Tornado's
`ws_connection.stream` and `_compressor` (private: `Transport` is the only reader).
"""
from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import logging
import math
import struct
import sys
import time
import weakref
from typing import Any, Callable
from urllib.parse import urlsplit

from engineio import exceptions as eio_exceptions
import tornado.web
import tornado.websocket
from engineio import async_socket
from engineio import packet as eio_packet
from tornado.iostream import IOStream, StreamClosedError

from .delivery import MAX_BACKLOG_BYTES, EngineServer, LeanQueue

log = logging.getLogger("droid.transport")

PROBING, UPGRADING, OPEN, CLOSED = "probing", "upgrading", "open", "closed"
# A client this far behind in reading is dropped: the contract's slow-consumer bound, in bytes,
# as Delivery counts it (before the message being written: one large message never trips it).
MAX_BUFFERED_BYTES = MAX_BACKLOG_BYTES
# Nagle's algorithm off on every WebSocket, as Node's servers do: the handshake and each event are
# small writes that must not wait for the peer's (delayed) acknowledgement of the previous one.
NODELAY = True
_CLIENT_KINDS = frozenset("123456")
_SIO_CLIENT_PACKETS = frozenset("0123")  # CONNECT, DISCONNECT, EVENT, ACK


# running handlers without a task each ----------------------------------------------------------

def run_eager(coro: Any) -> asyncio.Task | None:
    """Run a coroutine now, up to where it first waits: None if it finished there, else a Task
    that runs the rest (what Python 3.12's eager tasks do). It runs in a copy of the current
    context, the Task too. Exceptions raised before the first wait propagate."""
    ctx = contextvars.copy_context()
    try:
        awaited = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_Resumed(coro, awaited), context=ctx)


class _Resumed(collections.abc.Coroutine):
    """A coroutine that already yielded `awaited`, as a coroutine a Task can run from where it
    is: its first step hands the Task that same future, later steps and anything thrown in
    (cancellation, even before the first step) go to the coroutine."""

    __slots__ = ("coro", "awaited", "started")

    def __init__(self, coro: Any, awaited: Any) -> None:
        self.coro, self.awaited, self.started = coro, awaited, False

    def send(self, value: Any) -> Any:
        if not self.started:
            self.started = True
            awaited, self.awaited = self.awaited, None
            return awaited
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.started, self.awaited = True, None
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.awaited = None
        self.coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> "_Resumed":
        return self

    def __await__(self) -> "_Resumed":
        return self


def spawn_logged(coro: Any, what: str) -> None:
    """run_eager for work nobody waits for: failures are logged, never lost."""
    try:
        task = run_eager(coro)
    except Exception:
        log.exception("%s failed", what)
        return
    if task is not None:
        _pending.add(task)
        task.add_done_callback(_finished(what))


_pending: set[asyncio.Task] = set()


def _finished(what: str) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        _pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())
    return done


# frames ----------------------------------------------------------------------------------------

def frame_refusal(message: str | bytes) -> tuple[int, str] | None:
    """Why a WebSocket frame closes the connection (code, reason), or None: binary frames, text
    that is not an Engine.IO packet type 1-6, Socket.IO packets other than the four a client
    sends (droid.guard explains why)."""
    if isinstance(message, bytes):
        return 1003, "binary frame"
    kind = message[:1]
    if kind not in _CLIENT_KINDS:
        return 1008, "not an Engine.IO packet"
    if kind == "4" and message[1:2] not in _SIO_CLIENT_PACKETS:
        return 1008, "not a Socket.IO client packet"
    return None


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unfragmented, unmasked WebSocket frame (RFC 6455 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


# the transport ---------------------------------------------------------------------------------

class Transport:
    """One Engine.IO socket's WebSocket."""

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
        self.raw = self.conn._compressor is None
        self._closing = False

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
        """Write what python-engineio queued, then take every packet as it is sent."""
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
            self.send_text("3probe")
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

    # writing

    def send_packet(self, pkt: Any) -> None:
        """python-engineio's queue hands every packet of an attached socket here."""
        data = pkt.encode()
        if isinstance(data, str):
            self.send_text(data)
        else:
            self._write(data, 0x2)
        if pkt.packet_type == eio_packet.CLOSE:
            self.close(1000)

    def send_text(self, text: str | bytes) -> None:
        self._write(text.encode() if isinstance(text, str) else text, 0x1)

    def send_frames(self, frames: bytes, texts: tuple[bytes, ...]) -> bool:
        """Pre-built text frames (`frames`) of Engine.IO MESSAGEs holding these Socket.IO packets
        (`texts`, used when Tornado must compress); False when the
        socket takes nothing (closed, closing, or not live yet: then queue them instead)."""
        if self.state is not OPEN or self._closing:
            return False
        if self.raw:
            self._write_raw(frames)
        else:
            for text in texts:
                self._write(b"4" + text, 0x1)
        return True

    def _write(self, payload: bytes, opcode: int) -> None:
        if self._closing or self.state is CLOSED:
            return
        if self.raw:
            self._write_raw(ws_frame(payload, opcode))
            return
        before = self.buffered()
        try:
            self.conn.write_message(payload, binary=opcode == 0x2)
        except tornado.websocket.WebSocketClosedError:
            return
        self._check_bound(before)

    def _write_raw(self, data: bytes) -> None:
        stream = self.stream
        if stream.closed() or self.conn.server_terminated:
            return
        before = len(stream._write_buffer)
        if not before and type(stream) is IOStream:
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
        self._check_bound(before)

    def buffered(self) -> int:
        """Bytes written to this socket that have not reached the kernel yet."""
        buffer = getattr(self.stream, "_write_buffer", None)  # None once the stream is closed
        return len(buffer) if buffer is not None else 0

    def _check_bound(self, before: int) -> None:
        if before > self.server.max_buffered_bytes:
            log.warning("WebSocket client %s is %d bytes behind: disconnecting", self._peer(),
                        self.buffered())
            if self.server.on_overflow is not None:
                self.server.on_overflow(self.socket.sid)
            self.abort()

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
        if getattr(sock.queue, "transport", None) is self:
            sock.queue.transport = None
        self.handler = self.conn = self.stream = None
        if was in (PROBING, UPGRADING):
            sock.upgrading = False
            return
        spawn_logged(server.end_session(sock, server.reason.TRANSPORT_CLOSE), "closing a session")

    def _peer(self) -> str:
        handler = self.handler
        return getattr(getattr(handler, "request", None), "remote_ip", "?")


class TransportQueue(LeanQueue):
    """python-engineio's per-socket queue; once a WebSocket is attached, every packet put in it
    is written at once instead (the queue stays empty, so `close(wait=True)` does not wait)."""

    __slots__ = ("transport",)

    def __init__(self) -> None:
        super().__init__()
        self.transport: Transport | None = None

    def put_nowait(self, item: Any) -> None:
        transport = self.transport
        if transport is None:
            super().put_nowait(item)
        elif item is not None:
            transport.send_packet(item)


# pings -----------------------------------------------------------------------------------------

class PingWheel:
    """Every socket's next ping and ping deadline, in buckets of `resolution` seconds under one
    timer (python-engineio starts a task per socket that sleeps the ping interval, and that task
    keeps a closed socket alive until it wakes). Entries hold their socket weakly: a closed
    session is freed at once."""

    def __init__(self, server: "TransportServer") -> None:
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


# the engine server -----------------------------------------------------------------------------

class _Opener:
    """What AsyncSocket._upgrade_websocket calls for a WebSocket request (the driver table's
    `websocket` entry): attaches a Transport and returns at once, so that no task stays behind."""

    __slots__ = ("socket", "server")

    def __init__(self, handler: Any, server: "TransportServer") -> None:
        self.socket = handler.__self__  # the bound AsyncSocket._websocket_handler
        self.server = server

    async def __call__(self, environ: dict) -> None:
        handler = environ["tornado.handler"]
        if getattr(handler, "ws_connection", None) is None:
            return None
        # python-socketio keeps this environ for the socket's life (a direct WebSocket's is the
        # handshake's): the request body reader (a class object per request) and the WebSocket
        # handshake's own headers are of no use after it. (Rebuilding the dict to shrink it
        # would save 0.3 KB a socket for 1% of a connection's CPU: not done.)
        for key in _HANDSHAKE_ONLY:
            environ.pop(key, None)
        Transport(self.server, self.socket, handler).attach()
        return None


_HANDSHAKE_ONLY = ("wsgi.input", "HTTP_SEC_WEBSOCKET_KEY", "HTTP_SEC_WEBSOCKET_VERSION",
                   "HTTP_SEC_WEBSOCKET_EXTENSIONS", "HTTP_UPGRADE", "HTTP_CONNECTION",
                   "HTTP_CACHE_CONTROL", "HTTP_PRAGMA", "HTTP_ACCEPT_ENCODING")


class _Payload:
    """A request body as python-engineio reads it (`await environ['wsgi.input'].read(n)`): what
    its Tornado driver's `AwaitablePayload` does, without defining that class anew for every
    request (a class object is 2.5 KB and costs a type creation per request)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes | None) -> None:
        self.payload = payload or b""

    async def read(self, length: int | None = None) -> bytes:
        if length is None:
            r, self.payload = self.payload, b""
        else:
            r, self.payload = self.payload[:length], self.payload[length:]
        return r


def translate_request(handler: Any) -> dict:
    """python-engineio's Tornado `translate_request` (4.15), with a module-level body reader."""
    request = handler.request
    path = request.path
    query = request.query or ""
    environ = {
        "wsgi.input": _Payload(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.async": True,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": "aiohttp",
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": query,
        "RAW_URI": path + "?" + query if query else path,
        "SERVER_PROTOCOL": "HTTP/%s" % request.version,
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "SERVER_NAME": "aiohttp",
        "SERVER_PORT": "0",
        "tornado.handler": handler,
    }
    for name, value in request.headers.items():
        name = name.upper()
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            environ["HTTP_" + name.replace("-", "_")] = value
    environ["wsgi.url_scheme"] = environ.get("HTTP_X_FORWARDED_PROTO", "http")
    environ["PATH_INFO"] = urlsplit(path).path
    environ["SCRIPT_NAME"] = ""
    return environ


class TransportServer(EngineServer):
    """python-engineio's server with Droid's WebSocket transport (and lean queues)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_transports: dict[str, Transport] = {}
        self.wheel = PingWheel(self)
        self.max_buffered_bytes = MAX_BUFFERED_BYTES
        self.on_overflow: Callable[[str], None] | None = None
        # this server's copy of the driver table: WebSockets get a Transport, and requests an
        # environ without a class object defined per request
        self._async = dict(self._async, websocket=_Opener, translate_request=translate_request)

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return super().create_queue(*args, **kwargs)
        return TransportQueue()

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(target, "__func__", None) is async_socket.AsyncSocket._send_ping:
            self.wheel.ping_later(target.__self__)
            return None
        return super().start_background_task(target, *args, **kwargs)

    async def end_session(self, sock: Any, reason: Any) -> None:
        """End an Engine.IO session whose transport is gone (python-engineio does this at the
        end of its WebSocket loop), and forget it."""
        if not sock.closed:
            await sock.close(wait=False, abort=True, reason=reason)
        if self.sockets.get(sock.sid) is sock:
            del self.sockets[sock.sid]

    def transport(self, sid: str) -> Transport | None:
        return self.ws_transports.get(sid)


# the Tornado handler ---------------------------------------------------------------------------

class _SlimRequest:
    """What stays of a WebSocket's upgrade request after open(): enough for log lines."""

    __slots__ = ("method", "uri", "version", "remote_ip", "host", "protocol")

    def __init__(self, request: Any) -> None:
        self.method, self.uri, self.version = request.method, request.uri, request.version
        self.remote_ip, self.host, self.protocol = request.remote_ip, request.host, request.protocol

    def request_time(self) -> float:
        return 0.0


def tornado_handler(eio: TransportServer, *, compression: bool) -> type:
    """The Tornado handler of the Socket.IO endpoint: long-polling requests go to
    python-engineio; WebSocket requests get a Transport."""
    cors = eio.cors_allowed_origins
    allowed = None if cors == "*" or callable(cors) else [cors] if isinstance(cors, str) else cors

    class SocketIOHandler(tornado.websocket.WebSocketHandler):
        transport: Transport | None = None

        async def get(self, *args: Any, **kwargs: Any) -> None:
            if self.request.headers.get("Upgrade", "").lower() == "websocket":
                await super().get(*args, **kwargs)
            else:
                await eio.handle_request(self)

        async def post(self, *args: Any, **kwargs: Any) -> None:
            await eio.handle_request(self)

        async def options(self, *args: Any, **kwargs: Any) -> None:
            await eio.handle_request(self)

        async def open(self, *args: Any, **kwargs: Any) -> None:
            # Tornado reads no frame before this returns, and it returns once the transport is
            # attached (or the request refused): no task per connection stays behind.
            await eio.handle_request(self)
            if self.transport is None:
                log.info("closing WebSocket from %s: refused by Engine.IO",
                         self.request.remote_ip)
                self.close(1008)
                return
            self._trim()

        def _trim(self) -> None:
            # Tornado keeps these for the handler's life; a WebSocket needs none after open().
            # Its get() coroutine holds the request headers in a local until the connection
            # ends, so they are emptied rather than dropped.
            request = self.request
            self.request = _SlimRequest(request)  # type: ignore[assignment]
            headers = request.headers
            for name, value in list(vars(headers).items()):
                if isinstance(value, dict):  # its field maps: new empty ones free the old
                    setattr(headers, name, {})
            request.body = b""
            request.arguments = request.query_arguments = request.body_arguments = {}
            self.ui = None  # type: ignore[assignment]
            self._headers = None  # type: ignore[assignment]
            self.path_args = self.path_kwargs = None  # type: ignore[assignment]
            self.open_args = self.open_kwargs = None  # type: ignore[assignment]
            self._transforms = None  # type: ignore[assignment]

        def on_message(self, message: str | bytes) -> Any:
            transport = self.transport
            return transport.on_message(message) if transport is not None else None

        def on_close(self) -> None:
            transport = self.transport
            if transport is not None:
                transport.on_close()

        def check_origin(self, origin: str) -> bool:
            if callable(cors):
                return bool(cors(origin))
            if allowed is None or origin in allowed:
                return True
            return super().check_origin(origin)

        def get_compression_options(self) -> dict | None:
            return {} if compression else None

    return SocketIOHandler


__all__ = ["Transport", "TransportServer", "PingWheel", "run_eager", "spawn_logged",
           "frame_refusal", "tornado_handler", "ws_frame", "MAX_BUFFERED_BYTES"]
