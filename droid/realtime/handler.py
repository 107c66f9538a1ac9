"""The Tornado handler of the Socket.IO endpoint (/socket.io/): long-polling requests go to
python-engineio, WebSocket requests to Droid's transport."""
from __future__ import annotations

import logging
from typing import Any

import tornado.websocket

from . import adapter
from .transport import Transport, TransportServer

log = logging.getLogger("droid.transport")


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
    python-engineio; WebSocket requests get a Transport. Origins are checked before either sees
    the request (droid/realtime/guard.py)."""

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
            adapter.slim(self, _SlimRequest(self.request))

        def on_message(self, message: str | bytes) -> Any:
            transport = self.transport
            return transport.on_message(message) if transport is not None else None

        def on_close(self) -> None:
            transport = self.transport
            if transport is not None:
                transport.on_close()

        def check_origin(self, origin: str) -> bool:
            # prepare() has refused every origin the CORS rule does not allow (guard.py).
            return True

        def get_websocket_protocol(self) -> Any:
            return adapter.websocket_protocol(super().get_websocket_protocol())

        def get_compression_options(self) -> dict | None:
            # Without context takeover (adapter.websocket_protocol) a compressor is made per
            # message: zlib's hash table, cleared each time, is 8 KB at mem_level 5, 64 at 8.
            return {"mem_level": 5} if compression else None

    return SocketIOHandler
