"""Engine.IO sessions that are not on /events (issue 22, finding 1): capped per client address
(many source addresses on 127.0.0.0/8) and in all, ended within seconds when they send no
CONNECT, and freed at once when they end."""
from __future__ import annotations

import asyncio
import gc
import time
import uuid
import weakref

import jwt
import pytest

from conftest import TEST_SECRET, wait_until
from droid.realtime.sessions import address_key
from rawhttp import handshake, request, sid_of
from rawsio import RawSocket

pytestmark = pytest.mark.asyncio


def token() -> str:
    return jwt.encode({"sub": str(uuid.uuid4()), "exp": time.time() + 60}, TEST_SECRET,
                      algorithm="HS256")


async def _true(value):
    return value


def refused_as(reply, status: int, message: str) -> None:
    assert reply.status == status, reply
    assert reply.json() == {"statusCode": status, "error": reply.json()["error"],
                            "message": message}
    assert reply.headers["retry-after"] == "2"


async def test_handshakes_are_capped_per_client_address(droid_factory, listen, caplog):
    droid = await droid_factory(DROID_ANON_SESSIONS_PER_ADDRESS="3")
    for _ in range(3):
        assert (await handshake(droid.port)).status == 200
    for _ in range(20):
        refused_as(await handshake(droid.port), 429,
                   "Too many Socket.IO sessions from this address")
    # a flood of refusals is a line, then a line every 10 s with the count, not a line each
    assert sum("Socket.IO handshake" in r.getMessage() for r in caplog.records
               if r.name == "droid.sessions") == 1
    # a WebSocket handshake is refused the same way, before the upgrade
    ws = await request(droid.port, "/socket.io/?EIO=4&transport=websocket", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    refused_as(ws, 429, "Too many Socket.IO sessions from this address")
    # another address is not concerned
    assert (await handshake(droid.port, source="127.0.0.2")).status == 200
    assert droid.sio.sessions.count == 4


async def test_a_session_stops_counting_when_it_joins_events(droid_factory, listen):
    droid = await droid_factory(DROID_ANON_SESSIONS_PER_ADDRESS="2")
    assert (await handshake(droid.port)).status == 200
    tab = await listen(droid.url, token())  # the second handshake from 127.0.0.1
    await tab.next("connected")
    assert droid.sio.sessions.count == 1
    assert (await handshake(droid.port)).status == 200
    assert (await handshake(droid.port)).status == 429


async def test_handshakes_are_capped_in_all(droid_factory):
    droid = await droid_factory(DROID_ANON_SESSIONS_PER_ADDRESS="3", DROID_ANON_SESSIONS="8")
    replies = await asyncio.gather(*(handshake(droid.port, source=f"127.0.{i}.{j}")
                                     for i in range(1, 4) for j in (1, 2, 3)))
    assert sorted(r.status for r in replies) == [200] * 8 + [503]
    refused_as(next(r for r in replies if r.status == 503), 503, "Too many Socket.IO sessions")


async def test_ipv6_addresses_count_by_their_64():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3" == address_key("10.1.2.3")


async def test_a_session_without_connect_ends_in_seconds_one_with_connect_may_wait(
        droid_factory):
    droid = await droid_factory(DROID_CONNECT_PACKET_TIMEOUT_S="0.5", DROID_JOIN_TIMEOUT_S="3")
    started = time.monotonic()
    silent = sid_of(await handshake(droid.port))
    asking = sid_of(await handshake(droid.port))
    # a CONNECT that is refused (no token): the session may still try again until it joins
    posted = await request(droid.port, f"/socket.io/?EIO=4&transport=polling&sid={asking}",
                           method="POST", body=b"40/events,{}")
    assert posted.status == 200
    sockets = droid.sio.eio.sockets
    await wait_until(lambda: _true(silent not in sockets), timeout=3)
    assert asking in sockets and time.monotonic() - started < 2.5
    await wait_until(lambda: _true(asking not in sockets), timeout=5)
    assert time.monotonic() - started >= 2.9
    assert droid.sio.sessions.count == 0 and not droid.sio.sessions.by_address


async def test_ended_sessions_are_freed_at_once_without_the_collector(droid_factory):
    """Before: python-engineio's service task held a copy of the session list for up to 20 s,
    and each session's queue held the session (a cycle) until a full collection."""
    droid = await droid_factory(DROID_CONNECT_PACKET_TIMEOUT_S="0.3")
    gc.collect()
    gc.disable()
    try:
        refs = []
        for i in range(20):
            sid = sid_of(await handshake(droid.port, source=f"127.0.9.{i + 1}"))
            refs.append(weakref.ref(droid.sio.eio.sockets[sid]))
        raw = await RawSocket(droid.url).open_engineio()  # and a WebSocket one, closed by its client
        (ws_sid,) = [s for s in droid.sio.eio.sockets if s not in {r().sid for r in refs}]
        refs.append(weakref.ref(droid.sio.eio.sockets[ws_sid]))
        await raw.ws.close()
        await wait_until(lambda: _true(all(r() is None for r in refs)), timeout=5)
        assert not droid.sio.eio.sockets and droid.sio.sessions.count == 0
    finally:
        gc.enable()


def fast_pings(droid, interval: int = 1, timeout: int = 1) -> float:
    droid.sio.eio.ping_interval = interval
    droid.sio.eio.ping_timeout = timeout
    return interval + timeout + droid.sio.eio.wheel.resolution


async def test_a_long_polling_client_that_stops_polling_is_dropped_in_time(droid):
    """python-engineio's service task is off: the ping wheel keeps long-polling sessions' ping
    deadlines too."""
    limit = fast_pings(droid)
    base = "/socket.io/?EIO=4&transport=polling"
    sid = sid_of(await handshake(droid.port))
    await request(droid.port, f"{base}&sid={sid}", method="POST",
                  body=b'40/events,{"token":"%s"}' % token().encode())
    answer = await request(droid.port, f"{base}&sid={sid}")
    assert b"40/events," in answer.body  # joined; now it stops polling
    started = time.monotonic()
    await wait_until(lambda: _true(sid not in droid.sio.eio.sockets), timeout=limit + 3)
    assert time.monotonic() - started <= limit + 1


async def test_a_session_that_leaves_events_is_ended_at_its_next_ping(droid):
    fast_pings(droid)
    before = set(droid.sio.eio.sockets)
    raw = await RawSocket(droid.url).open({"token": token()})
    (sid,) = set(droid.sio.eio.sockets) - before
    await raw.send_raw("41/events,")  # leaves /events, keeps its Engine.IO session and pings
    await asyncio.wait_for(raw.closed.wait(), 5)
    assert sid not in droid.sio.eio.sockets


async def test_a_long_polling_session_keeps_no_request_of_its_handshake(droid):
    """python-socketio keeps the handshake's environ for the session's life; the handler in it
    held the request, its headers, connection and stream (~7.7 KB a session in all, ~2.8 KB
    without them): the address is what stays."""
    from tornado.web import RequestHandler

    def handlers() -> int:
        return sum(isinstance(o, RequestHandler) for o in gc.get_objects())
    gc.collect()
    before = handlers()
    gc.disable()
    try:
        sids = [sid_of(await handshake(droid.port, source=f"127.0.8.{i + 1}")) for i in range(5)]
        assert handlers() == before
        for sid in sids:
            assert droid.sio.environ[sid]["tornado.handler"].request.remote_ip.startswith("127.0.8.")
    finally:
        gc.enable()
