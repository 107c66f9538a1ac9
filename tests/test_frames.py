"""What a client sends on a WebSocket, as RFC 6455 says (issue 22, finding 10): an unmasked
frame fails the connection (5.1) with a close 1002, and a close frame with an invalid code is
answered with 1002 (7.4), one whose reason is not UTF-8 with 1007, instead of being echoed.
Raw frames over a raw socket: no client library sends these."""
from __future__ import annotations

import asyncio
import os
import struct

import pytest

pytestmark = pytest.mark.asyncio

HANDSHAKE = (b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    assert len(payload) < 126
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + \
        bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "RawWebSocket":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        ws = cls(reader, writer)
        opcode, payload = await ws.read()
        assert opcode == 0x1 and payload.startswith(b"0{"), payload  # Engine.IO's OPEN
        return ws

    async def read(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), 5)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(size), 5)

    async def closed_with(self) -> int:
        """The code of the server's close frame, once the server has closed the connection."""
        while True:
            opcode, payload = await self.read()
            if opcode == 0x8:
                break
        assert await asyncio.wait_for(self.reader.read(), 5) == b""  # and the connection ends
        return struct.unpack("!H", payload[:2])[0]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


async def test_an_unmasked_client_frame_fails_the_connection_with_1002(droid):
    ws = await RawWebSocket.open(droid.port)
    try:
        ws.send(frame(0x1, b"40/events,{}", masked=False))
        assert await ws.closed_with() == 1002
    finally:
        ws.close()
    assert not droid.sio.eio.sockets or all(s.closed or s.closing
                                            for s in droid.sio.eio.sockets.values())


async def test_an_unmasked_close_frame_is_refused_too(droid):
    ws = await RawWebSocket.open(droid.port)
    try:
        ws.send(frame(0x8, struct.pack("!H", 1000), masked=False))
        assert await ws.closed_with() == 1002
    finally:
        ws.close()


@pytest.mark.parametrize("payload, answer", [
    (struct.pack("!H", 0), 1002),
    (struct.pack("!H", 999), 1002),
    (struct.pack("!H", 1004), 1002),
    (struct.pack("!H", 1005), 1002),     # reserved: never sent on the wire
    (struct.pack("!H", 1006), 1002),
    (struct.pack("!H", 1015), 1002),
    (struct.pack("!H", 2999), 1002),
    (struct.pack("!H", 5000), 1002),
    (b"\x03", 1002),                     # one byte: no code
    (struct.pack("!H", 1000) + b"\xff\xfe", 1007),  # a reason that is not UTF-8
    (struct.pack("!H", 1000) + "bye ✓".encode(), 1000),  # valid ones are echoed
    (struct.pack("!H", 1001), 1001),
    (struct.pack("!H", 4000), 4000),
], ids=["0", "999", "1004", "1005", "1006", "1015", "2999", "5000", "one-byte", "bad-utf8",
        "1000-echoed", "1001-echoed", "4000-echoed"])
async def test_close_codes_are_answered_as_rfc_6455_says(droid, payload, answer):
    ws = await RawWebSocket.open(droid.port)
    try:
        ws.send(frame(0x8, payload))
        assert await ws.closed_with() == answer
    finally:
        ws.close()


async def test_masked_frames_are_served_as_before(droid):
    ws = await RawWebSocket.open(droid.port)
    try:
        ws.send(frame(0x1, b"40/"))  # CONNECT to "/": refused by the gateway, in a frame
        opcode, payload = await ws.read()
        assert opcode == 0x1 and payload.startswith(b"44"), payload
        ws.send(frame(0x8, b""))     # a close without a code is answered without one
        while True:
            opcode, payload = await ws.read()
            if opcode == 0x8:
                assert payload == b""
                break
    finally:
        ws.close()
