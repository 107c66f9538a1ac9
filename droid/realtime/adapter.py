"""The one module that uses private names of Tornado, python-engineio and python-socketio.

Droid serves /events on python-socketio (which decides connect, namespaces, events and acks) over
python-engineio (sessions, the handshake, long-polling) on Tornado, with its own WebSocket
transport (droid/realtime/transport.py). A few things it needs have no public API upstream; each
is reached here and only here, behind a name of Droid's, so that the rest of droid.realtime reads
as ordinary code and an upgrade that breaks one breaks this module alone.
`tests/test_adapter.py` checks every hook below (that it exists, takes the parameters Droid
passes, and is still called where Droid relies on it) and names the hook when one fails;
setup.cfg's upper bounds are the releases that test has passed on.

| hook | library | why Droid needs it | could be public upstream |
|---|---|---|---|
| `IOStream._write_buffer` | Tornado 6.6 | bytes written to a socket and not yet taken by the kernel: the slow-consumer bound (`buffered`) | yes: a `write_buffer_size()` |
| `WebSocketProtocol13._compressor` | Tornado 6.6 | whether per-message deflate was negotiated: pre-built frames can only be written raw without it (`deflating`) | yes: a `compression_negotiated` property |
| `WebSocketProtocol.server_terminated` | Tornado 6.6 | the server's close frame is out: write nothing more (`closing`) | it is public-looking but undocumented |
| `WebSocketProtocol13._receive_frame`, `_read_bytes`, `_handle_message`, `client_terminated` | Tornado 6.6 | RFC 6455 on what a client sends (`websocket_protocol`): an unmasked frame (5.1) and a close frame with an invalid code (7.4) or reason are answered with a close 1002 (1007 for a reason that is not UTF-8) and the connection closed; Tornado took unmasked frames and echoed any close code | yes: it is a bug fix (Tornado should check the mask bit and the close code) |
| `WebSocketProtocol13._create_compressors` | Tornado 6.6 | per-message deflate without context takeover either way (`websocket_protocol`): the server's answer adds `server_no_context_takeover` and `client_no_context_takeover` (RFC 7692 7.1.1 lets it), so no zlib stream is kept per socket (150-183 KB each); Tornado answers with the client's offer as it parsed it, and its parser drops parameters without a value, so no offer can ask for it | yes: a `no_context_takeover` compression option |
| `RequestHandler._headers`, `_transforms`, `ui`, `path_args`, `open_args` | Tornado 6.6 | what a WebSocket handler keeps for its whole life after `open()` and never reads again (`slim`) | a WebSocketHandler option to free the request |
| `AsyncServer._async` (the driver table) | python-engineio 4.15 | its `websocket` entry is what a session calls to serve a WebSocket (Droid's transport attaches there), its `translate_request` entry builds each request's environ (here without a class object per request) | yes: a transport factory parameter |
| `AsyncSocket._send_ping` | python-engineio 4.15 | the one background task each session starts (`start_background_task(self._send_ping)`, after every PONG): Droid's ping wheel takes its place instead of a sleeping task per socket | yes: a pluggable ping scheduler |
| `AsyncServer._engineio_server_class` | python-socketio 5.18 | which Engine.IO server class python-socketio builds (Droid's, with its transport) | yes: an `engineio_server_class` parameter |
| `AsyncServer._handle_connect` | python-socketio 5.18 | work that must run right after a CONNECT answer is written, in the same loop turn (`after_connect`) | yes: an "on connected" callback |
| `AsyncServer._handle_eio_connect` | python-socketio 5.18 | a new Engine.IO session: its deadline to join /events starts (`on_session`) | yes: socket.io's `connectTimeout` |
| `AsyncServer._handle_eio_disconnect` | python-socketio 5.18 | an Engine.IO session is ending: what Droid holds of it goes at once (`on_session_end`; droid/realtime/sessions.py) | yes: an "on session closed" callback |
| `AsyncServer._handle_eio_message` | python-socketio 5.18 | the one entry of every Socket.IO packet, both transports: malformed packets are refused before python-socketio parses them (`on_packet`) | yes: a packet filter hook |
| `AsyncRedisManager._publish`, `_listen` | python-socketio 5.18 | publishing and listening on Redis, replaced to survive outages (`publish_raw`, `listen_raw`) | they are its documented extension points for subclasses of `AsyncPubSubManager` |

Public but undocumented attributes used as they are, also checked by the test: a session's
`connected`, `upgrading`, `upgraded`, `closing`, `closed`, `last_ping`, `queue`, `sid`,
`schedule_ping()`, `receive()`, `send()`, `close()`; the engine server's `sockets`,
`ping_interval`, `ping_timeout`, `reason`; python-socketio's `manager.eio_sid_from_sid`,
`sid_from_eio_sid`, `is_connected`, `rooms`, `environ`.
"""
from __future__ import annotations

import struct
from typing import Any, Awaitable, Callable, Coroutine

import engineio
import socketio
import tornado.websocket
from engineio import async_socket
from tornado.iostream import IOStream, StreamClosedError

PING_TASK = async_socket.AsyncSocket._send_ping


# Tornado ---------------------------------------------------------------------------------------

def buffered(stream: IOStream | None) -> int:
    """Bytes written to `stream` that the kernel has not taken yet (0 once it is closed)."""
    buffer = getattr(stream, "_write_buffer", None)
    return len(buffer) if buffer is not None else 0


def deflating(conn: tornado.websocket.WebSocketProtocol) -> bool:
    """True when per-message deflate was negotiated on this WebSocket."""
    return getattr(conn, "_compressor", None) is not None


def closing(conn: tornado.websocket.WebSocketProtocol) -> bool:
    """True once the server's close frame has been sent (nothing may follow it)."""
    return bool(conn.server_terminated)


def slim(handler: tornado.websocket.WebSocketHandler, request: Any) -> None:
    """Drop what a WebSocket handler keeps for its life and never reads after open(); `request`
    replaces the request (enough of it for log lines). Its get() coroutine holds the request
    headers in a local until the connection ends, so they are emptied rather than dropped."""
    old = handler.request
    handler.request = request
    headers = old.headers
    for name, value in list(vars(headers).items()):
        if isinstance(value, dict):  # its field maps: new empty ones free the old
            setattr(headers, name, {})
    old.body = b""
    old.arguments = old.query_arguments = old.body_arguments = {}
    handler.ui = None  # type: ignore[assignment]
    handler._headers = None  # type: ignore[assignment]
    handler.path_args = handler.path_kwargs = None  # type: ignore[assignment]
    handler.open_args = handler.open_kwargs = None  # type: ignore[assignment]
    handler._transforms = None  # type: ignore[assignment]


def websocket_protocol(protocol: Any) -> Any:
    """`protocol` (what WebSocketHandler.get_websocket_protocol made) checking RFC 6455 on what
    its client sends, and deflating without context takeover: see `_DroidProtocol13`."""
    if type(protocol) is tornado.websocket.WebSocketProtocol13:
        protocol.__class__ = _DroidProtocol13
    return protocol


# close codes a peer may send (RFC 6455 7.4, and IANA's registry for 1012-1014)
_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def close_refusal(payload: bytes) -> int | None:
    """The close code that answers a client's close frame with this payload when it breaks RFC
    6455 (1002 for its code, 1007 for a reason that is not UTF-8), or None."""
    if not payload:
        return None
    if len(payload) == 1:
        return 1002
    code = struct.unpack("!H", payload[:2])[0]
    if code not in _CLOSE_CODES and not 3000 <= code <= 4999:
        return 1002
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return 1007
    return None


class _DroidProtocol13(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, failing the connection as RFC 6455 says on an unmasked client frame
    (5.1) and on a close frame with an invalid code or reason (7.4, 5.5.1), and, when
    per-message deflate is negotiated, answering that neither side keeps its compression
    context between messages (RFC 7692 7.1.1): each message is deflated and inflated on its own,
    and a socket keeps no zlib stream."""

    def _create_compressors(self, side: str, agreed_parameters: dict,
                            compression_options: dict | None = None) -> None:
        if side == "server":
            # the same dict Tornado then writes as its answer (Sec-WebSocket-Extensions)
            agreed_parameters["server_no_context_takeover"] = None
            agreed_parameters["client_no_context_takeover"] = None
        super()._create_compressors(side, agreed_parameters, compression_options)

    _frame_head = False

    async def _receive_frame(self) -> None:
        self._frame_head = True  # its first read is the frame's first two bytes
        await super()._receive_frame()

    async def _read_bytes(self, n: int) -> bytes:
        data = await super()._read_bytes(n)
        if self._frame_head:
            self._frame_head = False
            if not data[1] & 0x80:
                self._fail(1002, "frame not masked")
                raise StreamClosedError()
        return data

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        if opcode == 0x8 and not self.client_terminated:
            code = close_refusal(data)
            if code is not None:
                self._fail(code, "invalid close frame")
                return None
        return super()._handle_message(opcode, data)

    def _fail(self, code: int, reason: str) -> None:
        self.client_terminated = True  # nothing more is read: close() closes the stream
        self.close(code, reason)


# python-engineio -------------------------------------------------------------------------------

class EngineServerBase(engineio.AsyncServer):
    """python-engineio's AsyncServer with its private hooks turned into Droid's.

    Subclasses give `websocket_opener` (called as the driver's `websocket` entry is:
    `opener(session_handler, server)`, then awaited with the environ), `translate_request(handler)`
    and `ping_later(session)`, which replaces the ping task python-engineio starts per session.
    """

    websocket_opener: Any = None
    translate_request: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # this server's own copy of the driver table
        self._async = dict(self._async, websocket=self.websocket_opener,
                           translate_request=self.translate_request)

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(target, "__func__", None) is PING_TASK:
            self.ping_later(target.__self__)
            return None
        return super().start_background_task(target, *args, **kwargs)

    def ping_later(self, session: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def session_of(opener_target: Any) -> Any:
        """The session whose `_websocket_handler` the driver's `websocket` entry is given."""
        return opener_target.__self__


# python-socketio -------------------------------------------------------------------------------

class SocketIOServerBase(socketio.AsyncServer):
    """python-socketio's AsyncServer with its private hooks turned into Droid's:
    `engine_class()`, `around_connect(run)`, `on_session(eio_sid)`, `on_packet(eio_sid, data,
    handle)`, `on_session_end(eio_sid)`."""

    def _engineio_server_class(self) -> type:
        return self.engine_class()

    def engine_class(self) -> Any:
        return super()._engineio_server_class()

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        await self.around_connect(eio_sid, namespace, lambda: super(
            SocketIOServerBase, self)._handle_connect(eio_sid, namespace, data))

    async def around_connect(self, eio_sid: str, namespace: str | None,
                             run: Callable[[], Awaitable[None]]) -> None:
        await run()

    async def _handle_eio_connect(self, eio_sid: str, environ: dict) -> Any:
        result = await super()._handle_eio_connect(eio_sid, environ)
        self.on_session(eio_sid)
        return result

    def on_session(self, eio_sid: str) -> None:
        """A new Engine.IO session (not yet on any namespace)."""

    async def _handle_eio_disconnect(self, eio_sid: str, *args: Any) -> None:
        try:
            await super()._handle_eio_disconnect(eio_sid, *args)
        finally:
            self.on_session_end(eio_sid)

    def on_session_end(self, eio_sid: str) -> None:
        """An Engine.IO session is ending (python-engineio's `disconnect` event, fired from its
        close(), before `closed` is set); python-socketio has let go of it."""

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        await self.on_packet(eio_sid, data, super()._handle_eio_message)

    async def on_packet(self, eio_sid: str, data: Any,
                        handle: Callable[[str, Any], Coroutine]) -> None:
        await handle(eio_sid, data)


class RedisManagerBase(socketio.AsyncRedisManager):
    """python-socketio's AsyncRedisManager whose Redis side subclasses replace through
    `publish_raw(data)` and `listen_raw()` (its `_publish` and `_listen`)."""

    async def _publish(self, data: Any) -> None:
        await self.publish_raw(data)

    def _listen(self) -> Any:
        return self.listen_raw()

    async def publish_raw(self, data: Any) -> None:
        raise NotImplementedError

    def listen_raw(self) -> Any:
        raise NotImplementedError
