"""droid/realtime/transport.py, Droid's Engine.IO 4 WebSocket transport, on its own terms (issue 15).

Both reference clients (python-socketio's AsyncClient and the official JavaScript client) over a
direct WebSocket and over long-polling upgraded to one; that the sockets are served by the
transport and not by python-engineio's per-socket tasks; client close, server close, ping timeout
(a client that stops answering is dropped within ping interval + ping timeout), a half-open or
reset TCP connection, the bound on bytes buffered for a client that stops reading, shutdown; and
`run_eager`, which runs frame handlers without a task each. The /events conformance, raw-packet,
limits, chaos and resume suites run over the transport too (it is what make_app wires).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import pytest
import websockets

from conftest import publish_event, wait_until
from droid.realtime import wire as droid_wire
from droid.realtime.eager import run_eager
from droid.realtime.engine import TransportServer
from droid.realtime.transport import Transport
from test_events import mint
from test_events_js import Driver, events_url, js  # noqa: F401 - js is a fixture
from test_events_limits import StalledWebSocket, sid_of

pytestmark = pytest.mark.asyncio


def eio_sid(droid, sid: str) -> str:
    return droid.sio.manager.eio_sid_from_sid(sid, "/events")


def engineio_tasks() -> list[asyncio.Task]:
    """python-engineio's per-socket tasks: its WebSocket read loop, writer and ping task."""
    names = ("_websocket_handler", "writer", "_send_ping", "websocket_wait")
    return [t for t in asyncio.all_tasks() if any(n in _qualname(t) for n in names)]


def _qualname(task: asyncio.Task) -> str:
    """What the task runs; through transport.run_eager's wrapper (`.coro`) to the coroutine."""
    coro = task.get_coro()
    return getattr(getattr(coro, "coro", coro), "__qualname__", type(coro).__qualname__)


async def served_by_transport(droid, sid: str) -> Transport:
    transport = await wait_until(
        lambda: _async(droid.sio.eio.ws_transports.get(eio_sid(droid, sid))))
    assert transport.state == "open"
    assert droid.sio.eio.sockets[eio_sid(droid, sid)].upgraded
    return transport


async def _async(value):
    return value


class RawWs:
    """A raw Engine.IO client over `websockets` that answers pings only while told to."""

    async def open(self, url: str, token: str) -> "RawWs":
        self.ws = await websockets.connect(
            url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket",
            compression=None, max_size=None)
        self.opening = json.loads((await self.ws.recv())[1:])
        await self.ws.send('40/events,{"token":"%s"}' % token)
        answer = await asyncio.wait_for(self.ws.recv(), 5)
        assert answer.startswith("40/events,"), answer
        self.sid = json.loads(answer[len("40/events,"):])["sid"]
        return self

    async def read_until_closed(self, answer_pings: bool) -> list[str]:
        frames = []
        try:
            async for frame in self.ws:
                frames.append(frame)
                if frame == "2" and answer_pings:
                    await self.ws.send("3")
        except websockets.ConnectionClosed:
            pass
        return frames


# both clients, both transports -----------------------------------------------------------------

async def test_it_is_what_make_app_wires(droid):
    assert isinstance(droid.sio.eio, TransportServer)


@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]],
                         ids=["websocket", "polling-upgrade"])
async def test_python_client_over_the_transport(droid, listen, transports):
    user = str(uuid.uuid4())
    client = await listen(droid.url, mint(user), transports=transports)
    await client.next("connected")
    transport = await served_by_transport(droid, sid_of(client))
    assert client.client.eio.current_transport == "websocket"
    assert not engineio_tasks()
    ack = await client.client.call("ping", {"message": "hi"}, namespace="/events", timeout=5)
    assert ack is None or isinstance(ack, (dict, list))
    await client.next("pong", where=lambda d: d["message"] == "hi")
    await publish_event(droid, user, "task.created", {"taskId": "t1"})
    event = await client.next("task.created")
    assert event["data"]["taskId"] == "t1"
    assert transport.buffered() == 0


@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]],
                         ids=["websocket", "polling-upgrade"])
async def test_javascript_client_over_the_transport(droid, js, transports):  # noqa: F811
    user = str(uuid.uuid4())
    sock = js.open(events_url(droid), auth={"token": mint(user)}, transports=transports)
    await sock.connected()
    if transports[0] == "polling":
        assert (await sock.record("upgrade"))["transport"] == "websocket"
    sid = (await sock.record("connect"))["sid"]
    await served_by_transport(droid, sid)
    assert not engineio_tasks()
    assert await sock.call("ping", {"message": "js"})
    await publish_event(droid, user, "task.created", {"taskId": "t2"})
    event = await sock.next("task.created")
    assert event["data"]["taskId"] == "t2"


def server_tasks() -> list[asyncio.Task]:
    """Tasks running code of the server side (Tornado, python-engineio's server, Droid)."""
    def side(task: asyncio.Task) -> bool:
        coro = task.get_coro()
        code = getattr(getattr(coro, "coro", coro), "cr_code", None)  # through run_eager's wrapper
        name = code.co_filename if code is not None else ""
        return any(part in name for part in ("/tornado/", "/engineio/async_server",
                                             "/engineio/async_socket", "/droid/"))
    # python-engineio's one _service_task (per server, started by the first connection) aside
    return [t for t in asyncio.all_tasks() if side(t)
            and _qualname(t) != "AsyncServer._service_task"]


async def test_an_idle_socket_keeps_no_task_of_its_own(droid, listen):
    """python-engineio kept a read loop (with a pending wait_for), a writer and a ping task per
    socket, besides Tornado's; with the transport only Tornado's connection task is left."""
    before = len(server_tasks())
    clients = [await listen(droid.url, mint(str(uuid.uuid4()))) for _ in range(10)]
    for c in clients:
        await c.next("connected")
    # Idle: each welcome (run after the CONNECT answer, ending with connections.count) has
    # finished; under load the last ones may still be running when `connected` arrives.
    deadline = asyncio.get_running_loop().time() + 10
    while len(server_tasks()) - before > 10 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert len(server_tasks()) - before <= 10, [t.get_coro() for t in server_tasks()]
    assert not engineio_tasks()


# closing ---------------------------------------------------------------------------------------

async def test_client_close_ends_the_session(droid, listen):
    client = await listen(droid.url, mint(str(uuid.uuid4())))
    await client.next("connected")
    eid = eio_sid(droid, sid_of(client))
    await served_by_transport(droid, sid_of(client))
    await client.close()
    await wait_until(lambda: _async(eid not in droid.sio.eio.sockets
                                    and eid not in droid.sio.eio.ws_transports
                                    and not droid.gateway.sockets))


async def test_an_engineio_close_packet_closes_the_websocket(droid):
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    await raw.ws.send("1")
    await asyncio.wait_for(raw.ws.wait_closed(), 5)
    await wait_until(lambda: _async(not droid.sio.eio.sockets and not droid.sio.eio.ws_transports))


async def test_server_close_sends_close_and_closes_the_websocket(droid):
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    eid = next(iter(droid.sio.eio.ws_transports))
    reading = asyncio.create_task(raw.read_until_closed(answer_pings=True))
    await droid.sio.eio.disconnect(eid)
    frames = await asyncio.wait_for(reading, 5)  # python-engineio's loop kept it open 45 s
    assert frames[-1] == "1"
    await wait_until(lambda: _async(not droid.sio.eio.sockets and not droid.sio.eio.ws_transports
                                    and not droid.gateway.sockets))


async def test_a_reset_connection_ends_the_session_at_once(droid):
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    await wait_until(lambda: _async(len(droid.gateway.sockets) == 1))
    raw.ws.transport.abort()  # no close frame, no FIN handshake
    await wait_until(lambda: _async(not droid.sio.eio.sockets and not droid.gateway.sockets), 3)


async def test_shutdown_closes_every_websocket(droid, listen):
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    client = await listen(droid.url, mint(str(uuid.uuid4())))
    await client.next("connected")
    reading = asyncio.create_task(raw.read_until_closed(answer_pings=True))
    await droid.stop()
    await asyncio.wait_for(reading, 5)
    await wait_until(lambda: _async(not client.client.connected))
    assert not droid.sio.eio.ws_transports


# pings -----------------------------------------------------------------------------------------

def fast_pings(droid, interval: int = 1, timeout: int = 1) -> float:
    droid.sio.eio.ping_interval = interval
    droid.sio.eio.ping_timeout = timeout
    return interval + timeout + droid.sio.eio.wheel.resolution


async def test_a_client_that_stops_answering_is_dropped_in_time(droid):
    limit = fast_pings(droid)
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    assert raw.opening["pingInterval"] == 1000 and raw.opening["pingTimeout"] == 1000
    connected = time.monotonic()
    frames = await asyncio.wait_for(raw.read_until_closed(answer_pings=False), limit + 5)
    assert "2" in frames
    await wait_until(lambda: _async(not droid.gateway.sockets and not droid.sio.eio.sockets))
    # dropped after the first ping went unanswered: ping interval + ping timeout (+ the
    # wheel's resolution), not python-engineio's interval + 2 x timeout
    assert time.monotonic() - connected <= limit + 0.5


async def test_a_half_open_connection_is_dropped_by_the_ping_timeout(droid):
    """The peer neither reads nor writes nor closes (its host vanished): only the ping deadline
    can tell."""
    limit = fast_pings(droid)
    stalled = await StalledWebSocket().open(droid.url, mint(str(uuid.uuid4())))
    await wait_until(lambda: _async(len(droid.gateway.sockets) == 1))
    started = time.monotonic()
    await wait_until(lambda: _async(not droid.gateway.sockets and not droid.sio.eio.sockets),
                     limit + 5)
    assert time.monotonic() - started <= limit + 0.5
    stalled.close()


async def test_clients_that_answer_stay_connected(droid, listen, js):  # noqa: F811
    fast_pings(droid)
    py = await listen(droid.url, mint(str(uuid.uuid4())))
    sock = js.open(events_url(droid), auth={"token": mint(str(uuid.uuid4()))},
                   transports=["polling", "websocket"])
    await py.next("connected")
    await sock.connected()
    raw = await RawWs().open(droid.url, mint(str(uuid.uuid4())))
    answering = asyncio.create_task(raw.read_until_closed(answer_pings=True))
    pings = droid.sio.eio.ping_interval
    await asyncio.sleep(0)
    deadline = time.monotonic() + 4 * (pings + droid.sio.eio.ping_timeout)
    await wait_until(lambda: _async(time.monotonic() > deadline), 20, 0.2)
    assert len(droid.gateway.sockets) == 3
    assert not [r for r in sock.records if r["type"] == "disconnect"]
    assert py.client.connected and not answering.done()
    await raw.ws.close()


# the slow-consumer bound -----------------------------------------------------------------------

async def test_a_client_that_stops_reading_is_dropped_at_the_byte_bound(droid, listen, caplog):
    """What python-socketio sends (not only Delivery's envelopes) counts against the bound."""
    droid.sio.eio.bound = dataclasses.replace(droid.sio.eio.bound, bytes=256 * 1024)
    user = str(uuid.uuid4())
    healthy = await listen(droid.url, mint(user))
    await healthy.next("connected")
    stalled = await StalledWebSocket().open(droid.url, mint(user))
    await healthy.next("connections.count", where=lambda d: d["count"] == 2)
    stalled_sid = next(s for s in droid.gateway.sockets if s != sid_of(healthy))
    sent = 0
    while stalled_sid in droid.gateway.sockets:
        await droid.sio.emit("bulk", {"pad": "x" * 16_000}, to=stalled_sid, namespace="/events")
        sent += 1
        assert sent < 400, "never dropped"
        await asyncio.sleep(0)
    assert any("bytes behind" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records if r.name == "droid.transport")
    assert list(droid.gateway.sockets) == [sid_of(healthy)]
    await wait_until(lambda: _async(len(droid.sio.eio.ws_transports) == 1))
    stalled.close()


# run_eager -------------------------------------------------------------------------------------

async def test_run_eager_needs_no_task_when_nothing_waits():
    ran = []

    async def quick() -> None:
        ran.append(1)

    assert run_eager(quick()) is None
    assert ran == [1]


async def test_run_eager_finishes_in_a_task_what_has_to_wait():
    gate = asyncio.get_running_loop().create_future()

    async def slow() -> str:
        value = await gate
        await asyncio.sleep(0)
        return value + "!"

    task = run_eager(slow())
    assert isinstance(task, asyncio.Task) and not task.done()
    gate.set_result("done")
    assert await task == "done!"


async def test_run_eager_cancellation_reaches_the_coroutine():
    cleaned = []

    async def waits() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    task = run_eager(waits())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_run_eager_errors_after_a_wait_are_the_tasks():
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    task = run_eager(fails())
    with pytest.raises(ValueError):
        await task


async def test_frame_refusal():
    refuse = droid_wire.frame_refusal
    assert refuse(b"4") == (1003, "binary frame")
    assert refuse("7")[0] == 1008 and refuse("")[0] == 1008
    assert refuse("45/events,")[0] == 1008
    assert refuse('42/events,["ping"]') is None and refuse("3") is None


async def test_ws_frame_lengths():
    for size, head in ((5, 2), (126, 4), (70_000, 10)):
        frame = droid_wire.ws_frame(b"x" * size)
        assert frame[0] == 0x81 and len(frame) == size + head
    assert droid_wire.ws_frame(b"ab", 0x2)[0] == 0x82

