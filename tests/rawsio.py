"""A minimal Engine.IO 4 / Socket.IO 5 client over a raw WebSocket, for what real clients hide:
killing a transport without a goodbye, sending malformed packets, never reading."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets


class RawSocket:
    def __init__(self, base_url: str, namespace: str = "/events") -> None:
        self.url = base_url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self.namespace = namespace
        self.ws: Any = None
        self.events: list[tuple[str, Any]] = []
        self.connect_error: dict | None = None
        self.sid: str | None = None  # the Socket.IO sid on the namespace, once connected
        self.frames: list[str | bytes] = []  # every message the server sent, as received
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def open(self, auth: dict | None = None, *, read: bool = True) -> "RawSocket":
        """Handshake; raises ConnectionRefusedError with the server's message when refused."""
        self.ws = await websockets.connect(self.url, max_size=None, compression=None,
                                           open_timeout=20)
        opening = await asyncio.wait_for(self.ws.recv(), 20)
        assert opening.startswith("0{"), opening
        await self.ws.send(f"40{self.namespace}," + json.dumps(auth or {}))
        while True:
            answer = await asyncio.wait_for(self.ws.recv(), 20)
            if answer == "2":
                await self.ws.send("3")
                continue
            break
        prefix = f"4{self.namespace},"
        if answer.startswith("44" + self.namespace):
            self.connect_error = json.loads(answer[len(prefix) + 1:])
            await self.ws.close()
            raise ConnectionRefusedError(self.connect_error.get("message"))
        assert answer.startswith("40" + self.namespace), answer
        self.sid = json.loads(answer[len(prefix) + 1:]).get("sid")
        if read:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def open_engineio(self) -> "RawSocket":
        """Only the Engine.IO handshake: no Socket.IO CONNECT to any namespace. Every message
        the server sends is recorded in `frames`."""
        self.ws = await websockets.connect(self.url, max_size=None, compression=None,
                                           open_timeout=20)
        opening = await asyncio.wait_for(self.ws.recv(), 20)
        assert opening.startswith("0{"), opening
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        prefix = f"42{self.namespace},"
        try:
            async for message in self.ws:
                self.frames.append(message)
                self._changed.set()
                if message == "2":
                    await self.ws.send("3")
                elif isinstance(message, str) and message.startswith(prefix):
                    event, *args = json.loads(message[len(prefix):])
                    self.events.append((event, args[0] if args else None))
                    self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    def of(self, name: str) -> list[Any]:
        return [d for e, d in self.events if e == name]

    async def wait_for(self, predicate, timeout: float = 5.0) -> Any:
        async def loop() -> Any:
            while not (value := predicate()):
                if self.closed.is_set():
                    raise ConnectionError("socket closed while waiting")
                self._changed.clear()
                await self._changed.wait()
            return value
        return await asyncio.wait_for(loop(), timeout)

    async def emit(self, event: str, data: Any = None) -> None:
        await self.ws.send(f"42{self.namespace}," + json.dumps([event, data]))

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send(text)

    async def send_text_bytes(self, data: bytes) -> None:
        """A text frame holding exactly these bytes, valid UTF-8 or not."""
        await self.ws.send(data, text=True)

    def kill(self) -> None:
        """Drop the TCP connection without a WebSocket close or a Socket.IO disconnect."""
        self.ws.transport.abort()
        if self._reader is not None:
            self._reader.cancel()

    async def close(self) -> None:
        if self.ws is not None and self.ws.state.name == "OPEN":
            try:
                await self.ws.send(f"41{self.namespace},")
                await self.ws.close()
            except websockets.ConnectionClosed:
                pass
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
