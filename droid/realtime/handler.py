"""The Tornado handler of the Socket.IO endpoint (/socket.io/): long-polling requests go to
python-engineio, and so do WebSocket requests, whose handshake this handler answers once
python-engineio has accepted them (`accept_websocket`, called by droid/realtime/engine.py);
Tornado then lets the socket go to droid/realtime/websocket.py. Origins are checked before either
sees the request (droid/realtime/guard.py)."""
from __future__ import annotations

import logging
from typing import Any

import tornado.web

from ..web import write_error
from . import adapter
from .engine import TransportServer
from .websocket import (DEFLATE_RESPONSE, WebSocket, accept_key, deflate_offered,
                        handshake_refusal)

log = logging.getLogger("droid.transport")


def tornado_handler(eio: TransportServer, *, compression: bool) -> type:
    """The handler class; `compression`: negotiate per-message deflate when a client offers
    it."""

    class SocketIOHandler(tornado.web.RequestHandler):
        websocket: WebSocket | None = None

        async def get(self, *args: Any, **kwargs: Any) -> None:
            if self.request.headers.get("Upgrade", "").lower() != "websocket":
                await eio.handle_request(self)
                return
            refused = handshake_refusal(self.request.headers)
            if refused is not None:
                if refused[0] == 426:
                    self.set_header("Sec-WebSocket-Version", "13")
                write_error(self, *refused)
                return
            await eio.handle_request(self)
            if self.websocket is None and not getattr(self, "answered", True):
                log.info("refusing WebSocket from %s: refused by Engine.IO",
                         self.request.remote_ip)
                write_error(self, 400, "WebSocket refused")

        async def post(self, *args: Any, **kwargs: Any) -> None:
            await eio.handle_request(self)

        async def options(self, *args: Any, **kwargs: Any) -> None:
            await eio.handle_request(self)

        async def accept_websocket(self, max_message: int) -> tuple[WebSocket, bytes] | None:
            """Answer the handshake (101) and take the socket from Tornado; None when the
            client has gone meanwhile."""
            headers = self.request.headers
            deflate = compression and deflate_offered(headers)
            self.clear_header("Content-Type")
            self.set_status(101)
            self.set_header("Upgrade", "websocket")
            self.set_header("Connection", "Upgrade")
            self.set_header("Sec-WebSocket-Accept", accept_key(headers["Sec-WebSocket-Key"]))
            if deflate:
                self.set_header("Sec-WebSocket-Extensions", DEFLATE_RESPONSE)
            self.finish()
            # As Tornado's own WebSocketHandler: detached right after the answer, before the
            # HTTP connection would read another request from the stream.
            stream = self.detach()
            try:
                await stream.write(b"")  # the 101 is out
            except Exception:
                return None
            # The HTTP server's accept loop counts open descriptors (droid/http/listener.py):
            # this one is the WebSocket's to close from now on.
            hand_over = getattr(stream, "hand_over", None)
            taken = adapter.take_socket(stream)
            if taken is None:
                return None
            sock, leftover = taken
            self.websocket = WebSocket(sock, deflate=deflate, max_message=max_message,
                                       peer=self.request.remote_ip or "?",
                                       on_closed=hand_over() if hand_over else None)
            return self.websocket, leftover

    return SocketIOHandler
