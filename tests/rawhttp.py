"""One HTTP/1.1 request over a raw socket, from any local source address (any 127.x.y.z is
local on Linux): for tests that need many client addresses, or requests no client library
sends."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any


@dataclasses.dataclass
class RawReply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(port: int, path: str, *, source: str = "127.0.0.1", method: str = "GET",
                  body: bytes | None = None, headers: dict[str, str] | None = None,
                  timeout: float = 10.0) -> RawReply:
    """Send one request (Connection: close) from `source` and read the whole answer."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse(data)


def parse(data: bytes) -> RawReply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawReply(status, headers, body)


async def handshake(port: int, *, source: str = "127.0.0.1") -> RawReply:
    """An Engine.IO long-polling handshake (`reply.sid` on success)."""
    return await request(port, "/socket.io/?EIO=4&transport=polling", source=source)


def sid_of(reply: RawReply) -> str:
    match = re.search(rb'"sid":"([^"]+)"', reply.body)
    assert match, reply
    return match.group(1).decode()
