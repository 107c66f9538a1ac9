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
| `IOStream._read_buffer`, `_read_buffer_size`, `_state`, `socket` | Tornado 6.6 | after the WebSocket handshake (`RequestHandler.detach()`, public, gives the IOStream), the socket is served by droid/realtime/websocket.py without the stream: the bytes the stream read past the request, and its event-loop registration to remove (`take_socket`) | yes: an `IOStream.release()` returning the socket and the buffered bytes |
| `tornado.speedups.websocket_mask` | Tornado 6.6 | unmasking client frames in C (`unmask`; a pure-Python fallback otherwise) | it is importable, undocumented |
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

import socket
from typing import Any, Awaitable, Callable, Coroutine

import engineio
import socketio
from engineio import async_socket
from tornado.iostream import IOStream

# None when an upgrade renamed it: sessions would quietly go back to a ping task each, which
# tests/test_adapter.py catches.
PING_TASK = getattr(async_socket.AsyncSocket, "_send_ping", None)


# Tornado ---------------------------------------------------------------------------------------

def take_socket(stream: IOStream) -> tuple[socket.socket, bytes] | None:
    """The socket of a detached, flushed IOStream, with the bytes it had read past the request,
    for droid/realtime/websocket.py to serve; the stream lets go of it (its event-loop
    registration removed, so that it neither reads from it nor keeps it). None when the peer
    has gone meanwhile."""
    if stream.closed():
        return None
    leftover = bytes(stream._read_buffer[:stream._read_buffer_size])
    if stream._state is not None:
        stream.io_loop.remove_handler(stream.fileno())
        stream._state = None
    sock = stream.socket
    stream.socket = None  # type: ignore[assignment]
    return sock, leftover


try:
    from tornado.speedups import websocket_mask as _mask
except ImportError:  # Tornado built without its C extension
    _mask = None


def unmask(mask: bytes, data: bytes) -> bytes:
    """A client frame's payload, unmasked (RFC 6455 5.3): Tornado's C function when it has it."""
    if _mask is not None:
        return _mask(mask, data)
    key = int.from_bytes((mask * (len(data) // 4 + 1))[:len(data)], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(len(data), "big")


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
        if PING_TASK is not None and getattr(target, "__func__", None) is PING_TASK:
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
