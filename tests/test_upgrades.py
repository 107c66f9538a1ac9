"""One upgrade per Engine.IO session at a time, and the session id out of the access log
(issue 22, finding 6): a WebSocket that opens for a session already being upgraded is refused
(as Node's engine.io does), so whoever holds the `sid` cannot take over a session from the
WebSocket its client opened."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import jwt
import pytest
import websockets

from conftest import TEST_SECRET
from rawhttp import handshake, request, sid_of

pytestmark = pytest.mark.asyncio
POLLING = "/socket.io/?EIO=4&transport=polling"


async def joined_polling_session(droid) -> str:
    """A long-polling session on /events (what a browser has before it upgrades)."""
    token = jwt.encode({"sub": str(uuid.uuid4()), "exp": time.time() + 60}, TEST_SECRET,
                       algorithm="HS256")
    sid = sid_of(await handshake(droid.port))
    await request(droid.port, f"{POLLING}&sid={sid}", method="POST",
                  body=b'40/events,{"token":"%s"}' % token.encode())
    answer = await request(droid.port, f"{POLLING}&sid={sid}")
    assert b"40/events," in answer.body
    return sid


async def pong(ws) -> dict:
    """The next `pong` event on this WebSocket (what comes before it, a NOOP, is skipped)."""
    while True:
        frame = await asyncio.wait_for(ws.recv(), 5)
        if frame.startswith('42/events,["pong"'):
            return json.loads(frame[len("42/events,"):])[1]


def upgrade_url(droid, sid: str) -> str:
    return f"ws://127.0.0.1:{droid.port}/socket.io/?EIO=4&transport=websocket&sid={sid}"


async def test_a_second_websocket_for_a_session_being_upgraded_is_refused(droid):
    sid = await joined_polling_session(droid)
    first = await websockets.connect(upgrade_url(droid, sid), compression=None)
    try:
        # the second is refused before its handshake is answered (as Node's engine.io does)
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(upgrade_url(droid, sid), compression=None)
        assert refused.value.response.status_code == 400
        # the first upgrades as usual, and the session is its
        await first.send("2probe")
        assert await asyncio.wait_for(first.recv(), 5) == "3probe"
        await first.send("5")
        await first.send('42/events,["ping",{"message":"mine"}]')
        assert (await pong(first))["message"] == "mine"
        assert droid.sio.eio.transport(sid).ws is not None
    finally:
        await first.close()


async def test_a_websocket_for_an_upgraded_session_is_refused(droid):
    sid = await joined_polling_session(droid)
    first = await websockets.connect(upgrade_url(droid, sid), compression=None)
    try:
        await first.send("2probe")
        assert await asyncio.wait_for(first.recv(), 5) == "3probe"
        await first.send("5")
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(upgrade_url(droid, sid), compression=None)
        assert refused.value.response.status_code == 400
        await first.send('42/events,["ping",{"message":"still mine"}]')
        assert (await pong(first))["message"] == "still mine"
    finally:
        await first.close()


async def test_the_session_id_is_redacted_from_the_access_log(droid, caplog):
    caplog.set_level(logging.INFO, logger="tornado.access")
    sid = await joined_polling_session(droid)
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    polls = [line for line in lines if "transport=polling&sid=" in line]
    assert len(polls) == 2 and all("sid=[redacted]" in line for line in polls), lines
    assert not any(sid in line for line in lines)
