"""Per-message deflate without context takeover (issue 22, finding 8): with
DROID_WS_COMPRESSION=true a socket kept a zlib stream each way for its life (150-183 KB of RSS a
socket); the server now answers `server_no_context_takeover; client_no_context_takeover`, and
what Tornado's WebSocket code holds per socket stays small. Compressed events still flow."""
from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
import uuid

import jwt
import pytest
import websockets

from conftest import TEST_SECRET, Api
from test_events_js import events_url, finished, js  # noqa: F401 - js is a fixture

pytestmark = pytest.mark.asyncio


async def joined(droid) -> websockets.ClientConnection:
    ws = await websockets.connect(
        f"ws://127.0.0.1:{droid.port}/socket.io/?EIO=4&transport=websocket",
        compression="deflate")  # offers permessage-deflate; client_max_window_bits
    assert (await ws.recv()).startswith("0{")
    token = jwt.encode({"sub": str(uuid.uuid4()), "exp": time.time() + 60}, TEST_SECRET,
                       algorithm="HS256")
    await ws.send('40/events,{"token":"%s"}' % token)
    return ws


async def pong(ws, message: str) -> dict:
    await ws.send('42/events,["ping",{"message":"%s"}]' % message)
    while True:
        frame = await asyncio.wait_for(ws.recv(), 5)
        if frame.startswith('42/events,["pong"'):
            return json.loads(frame[len("42/events,"):])[1]


async def test_deflate_is_negotiated_without_context_takeover(droid_factory):
    droid = await droid_factory(DROID_WS_COMPRESSION="true")
    ws = await joined(droid)
    try:
        answer = ws.response.headers["Sec-WebSocket-Extensions"]
        assert answer.startswith("permessage-deflate")
        assert "server_no_context_takeover" in answer and "client_no_context_takeover" in answer
        for i in range(3):  # each message deflated and inflated on its own, both ways
            assert (await pong(ws, "compressed " * 50 + str(i)))["message"].endswith(str(i))
    finally:
        await ws.close()


async def test_a_compressed_socket_keeps_no_zlib_stream(droid_factory):
    """What Tornado's WebSocket code (its compressors included: zlib allocates through Python's
    raw allocator, which tracemalloc sees) still holds per socket once each socket has sent and
    received a compressed message. With context takeover it was over 256 KB."""
    droid = await droid_factory(DROID_WS_COMPRESSION="true")
    sockets = []
    tracemalloc.start(30)
    try:
        before = tracemalloc.take_snapshot()
        for i in range(10):
            ws = await joined(droid)
            sockets.append(ws)
            await pong(ws, "x" * 500)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    try:
        server = [tracemalloc.Filter(True, "*/tornado/websocket.py", all_frames=True)]
        grown = sum(s.size_diff for s in after.filter_traces(server).compare_to(
            before.filter_traces(server), "filename"))
        assert grown / len(sockets) < 32 * 1024, f"{grown / len(sockets) / 1024:.0f} KB a socket"
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_the_javascript_client_compresses_both_ways(droid_factory, js):  # noqa: F811
    """socket.io-client under Node (`ws`, which offers permessage-deflate and compresses what
    it sends over 1 KB) accepts the answer and keeps working, both transports."""
    droid = await droid_factory(DROID_WS_COMPRESSION="true")
    api = Api(droid.url)
    user = await api.register()
    tab = js.open(events_url(droid), auth={"token": user["token"]}, transports=["websocket"])
    upgrading = js.open(events_url(droid), auth={"token": user["token"]})
    for sock in (tab, upgrading):
        await sock.connected()
        [ack] = await sock.call("ping", {"message": "big " * 600})  # over 1 KB: compressed
        assert ack["message"] == ("big " * 600)[:1000]  # the gateway's cut
    assert (await upgrading.record("upgrade"))["transport"] == "websocket"
    task = (await api.post("/tasks", {"prompt": "deflated " * 100}, token=user["token"])).body
    for sock in (tab, upgrading):
        assert (await finished(sock, task["id"]))["data"]["response"]
    api.close()
