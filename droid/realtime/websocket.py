"""The server side of one WebSocket (RFC 6455, with RFC 7692's per-message deflate), on the raw
socket, driven by the event loop's reader and writer callbacks.

Why not Tornado's WebSocketHandler: it keeps, for each connection's whole life, the request's
coroutine chain and its task (`RequestHandler._execute` -> `get` -> `_receive_frame_loop`), the
handler with its request, the IOStream with its buffers and the HTTP connection objects: about
9 KB of an idle socket's 14 (tracemalloc), and the work of building and tearing them down on every
connect and disconnect. Here, once the handshake is answered, Tornado lets the socket go
(`RequestHandler.detach`, public), and a connection is this object, the socket, and a buffer only
while bytes wait: no task, no stream. It is also strict where Tornado 6.6 is lenient: a client
frame that is not masked closes the connection with 1002, as RFC 6455 5.1 requires, and so does
a close frame with a code no endpoint may send; text that is not UTF-8 closes with 1007.

Per-message deflate is negotiated (when DROID_WS_COMPRESSION is on and the client offers it)
without context takeover in either direction: each message is compressed and decompressed on its
own, so an idle socket keeps no zlib state (with context takeover, 150-180 KB a socket).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
import struct
import zlib
from typing import Any, Callable, Protocol

from . import adapter
from .wire import ws_frame

log = logging.getLogger("droid.transport")

OPEN, CLOSING, CLOSED = "open", "closing", "closed"
CLOSE_TIMEOUT_S = 5.0  # how long a close handshake may take before the socket is dropped
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_READ_SIZE = 65536
# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry): 1000-1003, 1007-1014,
# 3000-4999. 1004-1006 and 1015 must never be sent; the rest of 1000-2999 is reserved.
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                          1014))


def valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def handshake_refusal(headers: Any) -> tuple[int, str] | None:
    """Why an upgrade request is refused (status, message), or None."""
    if "upgrade" not in headers.get("Connection", "").lower():
        return 400, "Connection must include Upgrade"
    if headers.get("Sec-WebSocket-Version") != "13":
        return 426, "Sec-WebSocket-Version must be 13"
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return 400, "Sec-WebSocket-Key is invalid"
    return None


def deflate_offered(headers: Any) -> bool:
    """True when the client offers permessage-deflate (its parameters need no answer: the server
    answers without context takeover in both directions, which any client must accept)."""
    for offer in headers.get("Sec-WebSocket-Extensions", "").split(","):
        if offer.split(";")[0].strip().lower() == "permessage-deflate":
            return True
    return False


DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


class Listener(Protocol):
    """What a WebSocket hands its messages and its end to (the Engine.IO transport)."""

    def on_message(self, message: str | bytes) -> asyncio.Future | None: ...

    def on_close(self) -> None: ...


class WebSocket:
    """One WebSocket connection, server side."""

    __slots__ = ("sock", "fd", "loop", "listener", "inbuf", "outbuf", "state", "deflate",
                 "max_message", "parts", "part_opcode", "part_deflated", "paused", "timer",
                 "peer", "close_code", "on_closed")

    def __init__(self, sock: socket.socket, *, deflate: bool, max_message: int, peer: str,
                 on_closed: Callable[[], None] | None = None) -> None:
        """`on_closed` is called once the socket is closed (the accept loop's count)."""
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.listener: Listener | None = None
        self.inbuf: bytearray | None = None
        self.outbuf: bytearray | None = None
        self.state = OPEN  # the handshake is answered: messages may be sent
        self.deflate = deflate
        self.max_message = max_message
        self.parts: list[bytes] | None = None  # a fragmented message being received
        self.part_opcode = 0
        self.part_deflated = False
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.peer = peer
        self.close_code: int | None = None
        self.on_closed = on_closed

    # opening

    def start(self, listener: Listener, leftover: bytes = b"") -> None:
        """Start reading (after the 101 answer has been written); `leftover`: bytes the HTTP
        server had already read past the request."""
        self.listener = listener
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.loop.add_reader(self.fd, self._readable)
        if leftover:
            self.inbuf = bytearray(leftover)
            self._parse()

    # writing

    def send_message(self, payload: bytes, *, binary: bool = False) -> None:
        """One message, compressed when deflate was negotiated."""
        opcode = 0x2 if binary else 0x1
        if self.deflate:
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
            data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self.send_raw(ws_frame(data[:-4] if data.endswith(_DEFLATE_TAIL) else data, opcode,
                                   rsv1=True))
        else:
            self.send_raw(ws_frame(payload, opcode))

    def send_raw(self, data: bytes | memoryview) -> None:
        """Bytes of whole frames, written in order; what the kernel does not take now waits in
        `outbuf` until the socket is writable. Nothing is written after our close frame."""
        if self.state is OPEN:
            self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
        if self.outbuf:
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self.outbuf = bytearray(memoryview(data)[sent:])
            self.loop.add_writer(self.fd, self._writable)

    def buffered(self) -> int:
        """Bytes written that the kernel has not taken yet."""
        return len(self.outbuf) if self.outbuf else 0

    def _writable(self) -> None:
        out = self.outbuf
        if not out:
            self.loop.remove_writer(self.fd)
            return
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        del out[:sent]
        if not out:
            self.outbuf = None
            self.loop.remove_writer(self.fd)
            if self.state is CLOSING and self.timer is None:
                self._finish()  # our close frame is out, and theirs came first

    # reading

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        if not data:  # the peer closed its side
            self._finish()
            return
        if self.inbuf:
            self.inbuf += data
        else:
            self.inbuf = bytearray(data)
        self._parse()

    def _pause_until(self, pending: asyncio.Future) -> None:
        """Read nothing more until the handling of the last message is done: frames are handled
        in order."""
        self.paused = True
        self.loop.remove_reader(self.fd)
        pending.add_done_callback(self._resume)

    def _resume(self, _: Any) -> None:
        self.paused = False
        if self.state is OPEN or self.state is CLOSING:
            self.loop.add_reader(self.fd, self._readable)
            self._parse()

    def _parse(self) -> None:
        buf = self.inbuf
        while buf and not self.paused and self.state is not CLOSED:
            if len(buf) < 2:
                return
            b0, b1 = buf[0], buf[1]
            fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
            size, head = b1 & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, head = struct.unpack_from("!H", buf, 2)[0], 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, head = struct.unpack_from("!Q", buf, 2)[0], 10
            if not b1 & 0x80:
                return self._fail(1002, "an unmasked client frame")
            if opcode >= 8:
                if not fin or size > 125:
                    return self._fail(1002, "a fragmented or long control frame")
                if rsv:
                    return self._fail(1002, "reserved bits on a control frame")
            elif rsv and not (rsv == 0x40 and self.deflate and opcode != 0):
                return self._fail(1002, "reserved bits set")
            if size > self.max_message:
                return self._fail(1009, "a message over the size limit")
            end = head + 4 + size
            if len(buf) < end:
                return
            payload = adapter.unmask(bytes(buf[head:head + 4]), bytes(buf[head + 4:end]))
            del buf[:end]
            if not buf:
                self.inbuf = buf = None
            self._frame(bool(fin), bool(rsv), opcode, payload)

    def _frame(self, fin: bool, rsv1: bool, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:
            return self._on_close_frame(payload)
        if opcode == 0x9:
            self.send_raw(ws_frame(payload, 0xA))
            return
        if opcode == 0xA:
            return
        if opcode == 0x0:
            if self.parts is None:
                return self._fail(1002, "a continuation frame with nothing to continue")
            self.parts.append(payload)
            if sum(map(len, self.parts)) > self.max_message:
                return self._fail(1009, "a message over the size limit")
            if not fin:
                return
            payload, opcode, rsv1 = b"".join(self.parts), self.part_opcode, self.part_deflated
            self.parts = None
        elif opcode in (0x1, 0x2):
            if self.parts is not None:
                return self._fail(1002, "a new message inside a fragmented one")
            if not fin:
                self.parts, self.part_opcode, self.part_deflated = [payload], opcode, rsv1
                return
        else:
            return self._fail(1002, "an unknown opcode")
        if rsv1:
            inflater = zlib.decompressobj(-15)
            try:
                payload = inflater.decompress(payload + _DEFLATE_TAIL, self.max_message + 1)
            except zlib.error:
                return self._fail(1007, "a message that does not inflate")
            if len(payload) > self.max_message or inflater.unconsumed_tail:
                return self._fail(1009, "a message over the size limit")
        if opcode == 0x1:
            try:
                message: str | bytes = payload.decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(1007, "text that is not UTF-8")
        else:
            message = payload
        if self.state is not OPEN or self.listener is None:
            return
        pending = self.listener.on_message(message)
        if pending is not None and not pending.done():
            self._pause_until(pending)

    def _on_close_frame(self, payload: bytes) -> None:
        code = 1005  # no code
        if len(payload) == 1:
            return self._fail(1002, "a close frame of one byte")
        if len(payload) >= 2:
            code = struct.unpack_from("!H", payload)[0]
            if not valid_close_code(code):
                return self._fail(1002, f"close code {code}")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(1007, "a close reason that is not UTF-8")
        if self.state is CLOSING:  # the answer to ours
            self._finish()
            return
        # Echo the code (RFC 6455 5.5.1; none for none), then the server closes the TCP
        # connection.
        self._close_and_drop(None if code == 1005 else code)

    def _fail(self, code: int, why: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): our close frame, then the TCP connection."""
        log.info("closing WebSocket from %s: %s", self.peer, why)
        self.inbuf = None
        self._close_and_drop(code)

    def _close_and_drop(self, code: int | None) -> None:
        """Our close frame (unless sent already), then close the socket once it is out."""
        self.close(code)
        self.timer, timer = None, self.timer
        if timer is not None:
            timer.cancel()
        if not self.outbuf:
            self._finish()

    # closing

    def close(self, code: int | None = 1000, reason: str = "") -> None:
        """Start the close handshake: our close frame (without a code when `code` is None), then
        theirs (or CLOSE_TIMEOUT_S)."""
        if self.state is CLOSED or self.state is CLOSING:
            return
        self.state = CLOSING
        self.close_code = code
        self.parts = None
        payload = b"" if code is None else struct.pack("!H", code) + reason.encode()[:123]
        self._write(ws_frame(payload, 0x8))
        if self.state is CLOSING:
            self.timer = self.loop.call_later(CLOSE_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""
        self._finish()

    def _finish(self) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove_reader(self.fd)
        if self.outbuf is not None:
            self.loop.remove_writer(self.fd)
        self.inbuf = self.outbuf = self.parts = None
        try:
            self.sock.close()
        except OSError:
            pass
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.on_close()
