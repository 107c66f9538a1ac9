"""droid/realtime/websocket.py: the server side of a WebSocket, on its own terms (RFC 6455 and
RFC 7692), with a raw TCP client that can send what real clients never do."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import uuid

import pytest
import websockets

from conftest import publish_event
from test_events import mint

pytestmark = pytest.mark.asyncio


class RawTcp:
    """A WebSocket client written by hand: handshake, frames masked or not, fragments."""

    async def open(self, url: str, *, key: str | None = None, version: str = "13",
                   extensions: str | None = None) -> bytes:
        host, port = url.removeprefix("http://").split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
        head = (f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: {version}\r\n")
        if extensions:
            head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        self.writer.write((head + "\r\n").encode())
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)

    def frame(self, payload: bytes, opcode: int = 0x1, *, fin: bool = True,
              masked: bool = True) -> None:
        first = (0x80 if fin else 0) | opcode
        size = len(payload)
        head = bytes([first, (0x80 if masked else 0) | (size if size < 126 else 126)])
        if size >= 126:
            head += struct.pack("!H", size)
        if masked:
            mask = os.urandom(4)
            payload = mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + payload)

    async def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, await self.reader.readexactly(size)

    async def until(self, opcode: int) -> bytes:
        while True:
            kind, payload = await self.read_frame()
            if kind == opcode:
                return payload

    async def closed(self) -> bool:
        """True once the server has closed the TCP connection."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), 5):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def _opened(droid) -> RawTcp:
    raw = RawTcp()
    answer = await raw.open(droid.url)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    kind, opening = await raw.read_frame()
    assert (kind, opening[:2]) == (0x1, b"0{"), opening
    return raw


async def test_an_unmasked_client_frame_closes_with_1002(droid):
    raw = await _opened(droid)
    raw.frame(b'40/events,{}', masked=False)
    code = struct.unpack("!H", (await raw.until(0x8))[:2])[0]
    assert code == 1002
    assert await raw.closed()
    raw.close()


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
async def test_a_close_code_no_endpoint_may_send_is_answered_with_1002(droid, code):
    raw = await _opened(droid)
    raw.frame(struct.pack("!H", code), 0x8)
    assert struct.unpack("!H", (await raw.until(0x8))[:2])[0] == 1002
    assert await raw.closed()
    raw.close()


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_a_valid_close_code_is_echoed_and_the_server_closes_tcp(droid, code):
    raw = await _opened(droid)
    raw.frame(struct.pack("!H", code) + b"bye", 0x8)
    assert struct.unpack("!H", (await raw.until(0x8))[:2])[0] == code
    assert await raw.closed()
    raw.close()


async def test_text_that_is_not_utf8_closes_with_1007(droid):
    raw = await _opened(droid)
    raw.frame(b"40/events,\xff\xfe")
    assert struct.unpack("!H", (await raw.until(0x8))[:2])[0] == 1007
    raw.close()


async def test_a_fragmented_message_and_a_ping_between_its_fragments(droid):
    user = str(uuid.uuid4())
    raw = await _opened(droid)
    text = ('40/events,' + json.dumps({"token": mint(user)})).encode()
    raw.frame(text[:10], fin=False)
    raw.frame(b"are you there", 0x9)  # a control frame may come between fragments
    raw.frame(text[10:], 0x0)
    assert await raw.until(0xA) == b"are you there"
    answer = await raw.until(0x1)
    assert answer.startswith(b"40/events,"), answer
    raw.close()


@pytest.mark.parametrize("headers, status", [
    ({"key": "not base64!"}, 400), ({"key": base64.b64encode(b"short").decode()}, 400),
    ({"version": "8"}, 426)])
async def test_a_bad_handshake_is_refused_in_the_error_shape(droid, headers, status):
    raw = RawTcp()
    answer = await raw.open(droid.url, **headers)
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer
    body = await raw.reader.read(4096)
    assert json.loads(body)["statusCode"] == status
    if status == 426:
        assert b"sec-websocket-version: 13" in answer.lower()
    raw.close()


async def test_deflate_without_context_takeover_when_compression_is_on(droid_factory):
    droid = await droid_factory(DROID_WS_COMPRESSION="true")
    user = str(uuid.uuid4())
    url = droid.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with websockets.connect(url, compression="deflate", max_size=None) as ws:
        extensions = ws.response.headers["Sec-WebSocket-Extensions"]
        assert "permessage-deflate" in extensions
        assert "server_no_context_takeover" in extensions
        assert "client_no_context_takeover" in extensions
        assert (await ws.recv()).startswith("0{")
        await ws.send("40/events," + json.dumps({"token": mint(user)}))  # compressed by the client
        assert (await ws.recv()).startswith("40/events,")
        while "connected" not in await ws.recv():
            pass
        pad = "x" * 50_000  # compresses well: the frames on the wire are small
        await publish_event(droid, user, "task.created", {"taskId": "t", "pad": pad})
        while True:
            message = await asyncio.wait_for(ws.recv(), 5)
            if message.startswith('42/events,["task.created"'):
                assert pad in message
                break


async def test_without_compression_deflate_is_not_negotiated(droid):
    raw = RawTcp()
    answer = await raw.open(droid.url, extensions="permessage-deflate; client_max_window_bits")
    assert answer.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Extensions" not in answer
    raw.close()
