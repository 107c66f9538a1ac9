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
- `GuardedServer`: python-socketio's AsyncServer, whose `_handle_eio_message` (the one entry of
  every Socket.IO packet, long-polling included) refuses binary data, undecodable packets, and
  EVENTs that are not a list starting with an event name, and turns any exception of the
  dispatch into a disconnect. It overrides a private method of python-socketio: setup.cfg pins
  python-socketio below 6. Being Droid's one AsyncServer subclass, it is also where python-engineio
  is given its server class: `transport.TransportServer` (Droid's WebSocket transport, which
  applies `transport.frame_refusal` to every frame itself) when `transport=True`, else
  `delivery.EngineServer` (python-engineio's own WebSocket loop, lean per-socket queues).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import socketio
from socketio import packet as sio_packet

from .delivery import EngineServer
from .transport import TransportServer, frame_refusal

log = logging.getLogger("droid.guard")

_CLIENT_PACKETS = frozenset("0123")  # CONNECT, DISCONNECT, EVENT, ACK


def refusal(data: Any) -> str | None:
    """Why a Socket.IO packet (the text of an Engine.IO MESSAGE) is refused, or None."""
    if not isinstance(data, str):
        return "binary data"
    if not data or data[0] not in _CLIENT_PACKETS:
        return "not a client packet type"
    return None


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

    def __init__(self, *args: Any, transport: bool = False, **kwargs: Any) -> None:
        self._droid_transport = transport  # read by _engineio_server_class, during __init__
        super().__init__(*args, **kwargs)

    def _engineio_server_class(self) -> type:
        return TransportServer if self._droid_transport else EngineServer

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
        try:
            await self.eio.disconnect(eio_sid)
        except Exception:  # gone already
            log.debug("disconnecting %s failed", eio_sid, exc_info=True)
