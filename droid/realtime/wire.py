"""What /events looks like on the wire: its names, the packets a client may send, and the
encoding of what the server writes (Socket.IO EVENT packets and unmasked WebSocket frames).

Every module of droid.realtime reads these from here; nothing else encodes a frame.
"""
from __future__ import annotations

import struct

from engineio import packet as eio_packet

from ..util import dumps

NAMESPACE = "/events"
COUNT_EVENT = "connections.count"

# Engine.IO packet types a client sends: CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP.
CLIENT_ENGINE_PACKETS = frozenset("123456")
# What python-engineio takes in a long-polling POST: CLOSE, PONG, MESSAGE, UPGRADE.
POLLING_ENGINE_PACKETS = frozenset("1345")
# Socket.IO packet types a client sends: CONNECT, DISCONNECT, EVENT, ACK (never binary ones).
CLIENT_SOCKETIO_PACKETS = frozenset("0123")


def presence_room(user_id: str) -> str:
    """The python-socketio room of a user's sockets (connections.count with Redis)."""
    return f"sockets:{user_id}"


def ws_frame(payload: bytes, opcode: int = 0x1, *, rsv1: bool = False) -> bytes:
    """One unfragmented, unmasked WebSocket frame (RFC 6455 5.2), as a server sends it; `rsv1`
    marks a compressed message (RFC 7692)."""
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", first, 126, size)
    else:
        head = struct.pack("!BBQ", first, 127, size)
    return head + payload


def frame_refusal(message: str | bytes) -> tuple[int, str] | None:
    """Why a WebSocket frame from a client closes its connection (code, reason), or None:
    binary frames, text that is not an Engine.IO packet type 1-6, Socket.IO packets other than
    the four a client sends (droid.realtime.guard explains why)."""
    if isinstance(message, bytes):
        return 1003, "binary frame"
    kind = message[:1]
    if kind not in CLIENT_ENGINE_PACKETS:
        return 1008, "not an Engine.IO packet"
    if kind == "4" and message[1:2] not in CLIENT_SOCKETIO_PACKETS:
        return 1008, "not a Socket.IO client packet"
    return None


class Frames:
    """Socket.IO EVENT packets carrying one payload, encoded once for every socket: the JSON of
    the payload is built once, and so are the WebSocket frames, back to back in one buffer. An
    envelope goes out as two: its specific event, then `task.event`."""

    __slots__ = ("texts", "count", "ws_bytes", "size", "_packets")

    def __init__(self, events: tuple[str, ...], payload: dict,
                 namespace: str = NAMESPACE) -> None:
        head, body = b"2" + namespace.encode() + b",[", b"," + dumps(payload) + b"]"
        self.texts = tuple(head + dumps(event) + body for event in events)
        self.count = len(self.texts)
        self.ws_bytes = b"".join(ws_frame(b"4" + text) for text in self.texts)
        self.size = len(self.ws_bytes)
        self._packets: tuple[eio_packet.Packet, ...] | None = None

    def packets(self) -> tuple[eio_packet.Packet, ...]:
        """The same packets for a session's queue (long-polling, or a WebSocket not live yet)."""
        if self._packets is None:
            self._packets = tuple(eio_packet.Packet(eio_packet.MESSAGE, data=text.decode())
                                  for text in self.texts)
        return self._packets

    @classmethod
    def envelope(cls, event: str, envelope: dict) -> "Frames":
        return cls((event, "task.event"), envelope)
