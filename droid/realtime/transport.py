"""Droid's Engine.IO 4 WebSocket transport.

It carries every Engine.IO session over a WebSocket of the Socket.IO endpoint, whether the client
opened on a WebSocket or upgraded to one from long-polling: the probe/upgrade exchange on the
WebSocket side, reading messages, writing packets and pre-encoded frames (`Transport`), and
closing. The WebSocket itself is droid/realtime/websocket.py's, the engine server and the
handshake droid/realtime/engine.py's, pings droid/realtime/pings.py's. python-socketio still
decides connect, namespaces, events and acks (every MESSAGE goes to the session's `receive`, as
python-engineio's own WebSocket loop hands it), and python-engineio still owns the session, the
Engine.IO handshake and long-polling, including the polling side of an upgrade.

**Each session's queue** (`SessionQueue`, given to every session through python-engineio's
public `create_queue` hook) is the one door of what is written to it: python-engineio's packets
(the OPEN packet, python-socketio's CONNECT answers and acks, pings) and Delivery's pre-encoded
frames (`send_frames`). While the session has no live WebSocket (long-polling, or an upgrade not
finished) it holds packets for the next poll; once the transport is live, everything is written
at once instead: no writer task, and with nothing waiting before it, straight to the socket.

**The slow-consumer bound** is checked there, once per write, whatever wrote: a session with
more than `Bound.messages` messages, or more than `Bound.bytes` bytes, not yet taken by its
client (queued, or written to the WebSocket and not yet taken by the kernel) is shed: one
WARNING line, one `on_shed` call (the metric), and its connection ends; the client can come back
and resume with `lastSeq`. Bytes are counted before the message being written, so that one large
message alone never trips the bound: a session holds at most the bound plus one message.

**Why not python-engineio's WebSocket loop**: it keeps, per socket, a read-loop task whose
`wait_for` adds a task and a timer per received frame, a writer task, a ping task sleeping 25 s,
and a Tornado handler with an asyncio receive queue; that was most of an idle socket's memory
and of a connection's cost (bench/RESULTS.md). Here `on_message` hands each message on at once:
no receive queue, and no task unless its handling has to wait (`run_eager`; the WebSocket reads
nothing more until it is done, so messages are still handled in order).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable

from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet

from ..config import MAX_BACKLOG, MAX_BACKLOG_BYTES
from .eager import run_eager, spawn_logged
from .queue import LeanQueue
from .websocket import WebSocket
from .wire import Frames, frame_refusal

log = logging.getLogger("droid.transport")

PROBING, UPGRADING, OPEN, CLOSED = "probing", "upgrading", "open", "closed"


@dataclasses.dataclass(frozen=True)
class Bound:
    """The slow-consumer bound, and what to call (with the Engine.IO sid) when it sheds one."""

    messages: int = MAX_BACKLOG
    bytes: int = MAX_BACKLOG_BYTES
    on_shed: Callable[[str], None] | None = None


class SessionQueue(LeanQueue):
    """python-engineio's queue of one session, and the door of everything written to it."""

    __slots__ = ("bound", "session", "transport", "direct", "shed")

    def __init__(self, bound: Bound) -> None:
        super().__init__()
        self.bound = bound
        self.session: Any = None      # the AsyncSocket, once the engine server has made it
        self.transport: Any = None    # the WebSocket transport, once attached and live
        self.direct = 0               # messages written to the transport since it drained
        self.shed = False

    def put_nowait(self, item: Any) -> None:
        if self.shed:
            return
        transport = self.transport
        if transport is None:
            before = self.bytes
            super().put_nowait(item)
            self._check(before)
        elif item is not None:  # None: python-engineio waking its own (absent) writer
            before = self._written_before()
            transport.send_packet(item)
            self.direct += 1
            self._check(before)

    def send_frames(self, frames: Frames) -> None:
        """Delivery's pre-encoded packets: written at once on a live WebSocket, else queued."""
        if self.shed:
            return
        transport = self.transport
        if transport is not None and transport.live:
            before = self._written_before()
            transport.send_frames(frames)
            self.direct += frames.count
            self._check(before)
            return
        before = self.bytes
        for packet in frames.packets():
            super().put_nowait(packet)
        self._check(before)

    def pending(self) -> tuple[int, int]:
        """Messages and bytes written to this session that its client has not taken yet."""
        transport = self.transport
        if transport is None:
            return self.qsize(), self.bytes
        buffered = transport.buffered()
        return self.qsize() + (self.direct if buffered else 0), self.bytes + buffered

    def _written_before(self) -> int:
        buffered = self.transport.buffered()
        if not buffered:
            self.direct = 0  # everything written before has reached the kernel
        return self.bytes + buffered

    def _check(self, before: int) -> None:
        bound = self.bound
        if before > bound.bytes or self.pending()[0] > bound.messages:
            self.cut()

    def cut(self) -> None:
        """Shed this session now (the bound is passed, or a replay waited too long)."""
        if self.shed:
            return
        self.shed = True
        session = self.session
        sid = getattr(session, "sid", "?")
        messages, size = self.pending()
        log.warning("client %s fell %d messages or %d bytes behind (bound %d or %d): "
                    "disconnecting it", sid, messages, size, self.bound.messages,
                    self.bound.bytes)
        if self.bound.on_shed is not None:
            self.bound.on_shed(sid)
        super().clear()
        if self.transport is not None:
            self.transport.abort()  # the stream's end ends both sessions
        elif session is not None:
            session.server.end_session_soon(session)


class Transport:
    """One Engine.IO session's WebSocket (droid/realtime/websocket.py)."""

    __slots__ = ("server", "socket", "ws", "state", "_closing")

    def __init__(self, server: Any, socket: Any, ws: WebSocket) -> None:
        self.server = server
        self.socket = socket
        self.ws: WebSocket | None = ws
        self.state = OPEN
        self._closing = False

    @property
    def live(self) -> bool:
        return self.state is OPEN and not self._closing

    # opening

    def attach(self) -> None:
        sock = self.socket
        self.server.ws_transports[sock.sid] = self
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
        """Write pre-built Engine.IO MESSAGE frames (compressed one by one when the WebSocket
        negotiated deflate)."""
        ws = self.ws
        if not self.live or ws is None:
            return
        if ws.deflate:
            for text in frames.texts:
                ws.send_message(b"4" + text)
        else:
            ws.send_raw(frames.ws_bytes)

    def _write(self, payload: bytes, opcode: int) -> None:
        ws = self.ws
        if self._closing or self.state is CLOSED or ws is None:
            return
        ws.send_message(payload, binary=opcode == 0x2)

    def buffered(self) -> int:
        """Bytes written to this socket that have not reached the kernel yet."""
        ws = self.ws
        return ws.buffered() if ws is not None else 0

    # closing

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the WebSocket after what is buffered (the close handshake)."""
        if self._closing or self.state is CLOSED:
            return
        self._closing = True
        if self.ws is not None:
            self.ws.close(code, reason or "")

    def abort(self) -> None:
        """Drop the connection now: no close handshake (the client is not reading, or gone)."""
        self._closing = True
        if self.ws is not None:
            self.ws.abort()

    def on_close(self) -> None:
        """The WebSocket is gone: end the Engine.IO session unless it continues over
        long-polling (a failed upgrade)."""
        if self.state is CLOSED:
            return
        was, self.state = self.state, CLOSED
        sock, server = self.socket, self.server
        if server.ws_transports.get(sock.sid) is self:
            del server.ws_transports[sock.sid]
        if sock.queue.transport is self:
            sock.queue.transport = None
        self.ws = None
        if was in (PROBING, UPGRADING):
            sock.upgrading = False
            return
        spawn_logged(server.end_session(sock, server.reason.TRANSPORT_CLOSE), "closing a session")

    def _peer(self) -> str:
        ws = self.ws
        return ws.peer if ws is not None else "?"


__all__ = ["Bound", "SessionQueue", "Transport"]
