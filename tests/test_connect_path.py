"""The /events connect path under load: how many turns of the event loop a connection waits for,
and the listening socket's backlog (a connection storm must not overflow it)."""
from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess

import pytest
import socketio

from conftest import make_config, publish_event
from droid import serving as droid_main
from droid.realtime import transport as droid_transport
from droid.realtime.delivery import Delivery
from droid.realtime.guard import GuardedServer
from rawsio import RawSocket
from test_events import mint

pytestmark = pytest.mark.asyncio


class Turns:
    """Counts turns of the running event loop: a callback that schedules itself again runs
    exactly once per turn (asyncio runs only what was ready when the turn began)."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_connected_and_the_count_follow_the_connect_answer_in_its_turn(droid, monkeypatch):
    """The CONNECT answer, `connected` and `connections.count` are written in one turn of the
    event loop (the client reads them together), not a task and a store read later: in a
    connection storm a turn lasts milliseconds, and every client waits that much longer."""
    turns = Turns()
    written: dict[str, dict[str, int]] = {}
    send_packet = droid_transport.Transport.send_packet
    send, send_user = Delivery.send, Delivery.send_user

    def spy_send_packet(self, pkt):
        data = pkt.data
        if isinstance(data, str) and data.startswith("0/events,"):
            written.setdefault(self.socket.sid, {})["answer"] = turns.count
        return send_packet(self, pkt)

    def spy_send(self, sid, event, payload):
        eio_sid = self.outboxes[sid].queue.session.sid
        written.setdefault(eio_sid, {}).setdefault(event, turns.count)
        return send(self, sid, event, payload)

    def spy_send_user(self, user_id, event, payload):
        for box in self.by_user.get(user_id, {}).values():
            written.setdefault(box.queue.session.sid, {}).setdefault(event, turns.count)
        return send_user(self, user_id, event, payload)

    monkeypatch.setattr(droid_transport.Transport, "send_packet", spy_send_packet)
    monkeypatch.setattr(Delivery, "send", spy_send)
    monkeypatch.setattr(Delivery, "send_user", spy_send_user)
    sockets = []
    try:
        for i in range(3):
            raw = await RawSocket(droid.url).open({"token": mint(f"turns-{i}")})
            sockets.append(raw)
            await raw.wait_for(lambda: raw.of("connected") and raw.of("connections.count"))
    finally:
        turns.stop()
        for raw in sockets:
            await raw.close()
    assert len(written) == 3, written
    for turn in written.values():
        assert turn["answer"] == turn["connected"] == turn["connections.count"], written


async def test_connected_does_not_wait_for_the_store_and_nothing_after_it_is_lost(droid,
                                                                                 monkeypatch):
    """`connected` is written while the socket's store read (where its user's envelopes stand)
    is still out, and an envelope published after `connected` reaches the socket even when that
    read, answering late, has already counted it."""
    store = droid.store
    real_last_seq = store.last_seq
    gate = asyncio.Event()
    reading = asyncio.Event()

    async def slow_last_seq(user_id: str) -> int:
        reading.set()
        await gate.wait()  # answers after the publish below, so it counts that envelope
        return await real_last_seq(user_id)

    monkeypatch.setattr(store, "last_seq", slow_last_seq)
    raw = await RawSocket(droid.url).open({"token": mint("slow-store")})
    try:
        await raw.wait_for(lambda: raw.of("connected"))
        assert reading.is_set() and not gate.is_set()
        await publish_event(droid, "slow-store", "task.cancelled", {"taskId": "t-1"})
        gate.set()
        await raw.wait_for(lambda: raw.of("task.event"))
        assert [e["data"]["taskId"] for e in raw.of("task.cancelled")] == ["t-1"]
        assert raw.of("task.cancelled")[0]["seq"] == await real_last_seq("slow-store")
    finally:
        gate.set()
        await raw.close()


async def test_after_connect_runs_only_for_an_accepted_connection():
    """GuardedServer.after_connect: the coroutine runs once the CONNECT answer is out; on a
    connection refused after it was handed over, it is closed without running (no 'never
    awaited' warning); outside a connect handler it is refused and left to the caller."""
    sio = GuardedServer(async_mode="tornado")
    ran: list[str] = []

    async def welcome(name: str) -> None:
        ran.append(name)

    async def connect(sid, environ, auth):
        assert sio.after_connect(welcome(auth["name"]))
        if auth.get("refuse"):
            raise socketio.exceptions.ConnectionRefusedError("no")

    sio.on("connect", connect, namespace="/x")
    sent: list[tuple[str, object]] = []

    async def fake_send(eio_sid, pkt):  # what the CONNECT answer / refusal would write
        sent.append((eio_sid, pkt.packet_type))
        ran.append(f"sent {pkt.packet_type}")

    sio._send_packet = fake_send
    for eio_sid, auth in (("e1", {"name": "accepted"}), ("e2", {"name": "refused", "refuse": 1})):
        sio.environ[eio_sid] = {}
        await sio._handle_connect(eio_sid, "/x", auth)
    # CONNECT (0) then the welcome for e1; CONNECT_ERROR (4) and no welcome for e2
    assert ran == ["sent 0", "accepted", "sent 4"], ran
    orphan = welcome("outside")
    assert sio.after_connect(orphan) is False
    assert inspect.getcoroutinestate(orphan) == inspect.CORO_CREATED
    orphan.close()


def _listen_backlog(port: int) -> int:
    """The accept-queue limit of the socket listening on this port, as `ss -ltn` reports it."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[2])  # State Recv-Q Send-Q ...: Send-Q is the backlog


async def test_the_listening_socket_takes_a_connection_storm():
    """Droid listens with a backlog of 1024 (Node: 511), not Tornado's default 128: with
    thousands of clients (re)connecting at once, a full accept queue drops their handshakes,
    and each dropped client waits a second or more before its SYN is retried."""
    sockets = droid_main.listen(make_config())
    try:
        port = sockets[0].getsockname()[1]
        want = min(droid_main.LISTEN_BACKLOG, _somaxconn())
        assert _listen_backlog(port) == want
        assert want >= 511
        assert all(s.type == socket.SOCK_STREAM for s in sockets)
    finally:
        for s in sockets:
            s.close()


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())
