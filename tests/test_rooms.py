"""droid/realtime/rooms.py: python-socketio's rooms indexed both ways, so that connects and
disconnects cost the same at any number of sockets (issue 21). Speed is measured by
bench/scale.py; this proves the index stays right: after many random connects, subscribes,
unsubscribes, clean disconnects and abrupt drops over several users, the room, delivery and
presence bookkeeping holds exactly the sockets still connected, and every socket's last
`connections.count` is its user's count."""
from __future__ import annotations

import asyncio
import random

import pytest

from conftest import wait_until
from droid.realtime.rooms import IndexedRooms, SidSet
from droid.realtime.wire import NAMESPACE, presence_room
from rawsio import RawSocket
from redis_server import redis_server  # noqa: F401
from test_events import mint

USERS = 12
OPERATIONS = 1200
MAX_OPEN = 120


async def _async(value):
    return value


def test_sid_set_answers_the_list_methods_python_socketio_uses():
    sids = SidSet(["a", "b"])
    sids.append("c")
    sids.remove("a")
    assert list(sids) == ["b", "c"] and "b" in sids and "a" not in sids and len(sids) == 2
    with pytest.raises(ValueError):
        sids.remove("a")


async def _churn(app, seed: int) -> dict[str, RawSocket]:
    """Random traffic; returns the sockets still open, by sid."""
    rng = random.Random(seed)
    open_: dict[str, tuple[str, RawSocket]] = {}
    drops = closes = 0
    for _ in range(OPERATIONS):
        roll = rng.random()
        if len(open_) < 5 or (roll < 0.5 and len(open_) < MAX_OPEN):
            user = f"rooms-{rng.randrange(USERS)}"
            auth = {"token": mint(user)}
            if rng.random() < 0.3:
                auth["lastSeq"] = 0
            try:
                sock = await RawSocket(app.url).open(auth)
            except ConnectionRefusedError:  # this user's 20 sockets are open
                continue
            open_[sock.sid] = (user, sock)
        elif roll < 0.65:
            _, sock = open_[rng.choice(list(open_))]
            await sock.emit(rng.choice(["subscribe.tasks", "unsubscribe.tasks", "ping"]),
                            {"lastSeq": 0} if rng.random() < 0.5 else {})
        else:
            sid = rng.choice(list(open_))
            _, sock = open_.pop(sid)
            if rng.random() < 0.5:
                sock.kill()  # no WebSocket close, no Socket.IO disconnect
                drops += 1
            else:
                await sock.close()
                closes += 1
    assert drops > 100 and closes > 100
    return {sid: pair for sid, pair in open_.items()}


async def _check(app, open_: dict) -> None:
    users: dict[str, int] = {}
    for user, _ in open_.values():
        users[user] = users.get(user, 0) + 1
    # abrupt drops are noticed when the kernel reports the reset: wait until they are processed
    await wait_until(lambda: _async(set(app.gateway.sockets) == set(open_)), timeout=30)
    manager = app.sio.manager
    assert isinstance(manager, IndexedRooms)
    rooms = manager.rooms.get(NAMESPACE, {})
    assert set(rooms.get(None, {})) == set(open_)
    for room, members in rooms.items():
        assert members, f"an empty room {room!r} is left"
        assert set(members) <= set(open_), f"room {room!r} holds sockets that are gone"
    expected_extra = {sid: presence_room(user) for sid, (user, _) in open_.items()} \
        if app.config.redis_url else {}
    assert manager.extra_rooms.get(NAMESPACE, {}) == expected_extra
    for sid, (user, _) in open_.items():
        assert sorted(manager.get_rooms(sid, NAMESPACE)) == sorted(
            [sid] + ([presence_room(user)] if app.config.redis_url else []))
    assert not manager.pending_connect and not manager.pending_disconnect
    delivery = app.realtime.delivery
    assert set(delivery.outboxes) == set(open_)
    assert {u: len(b) for u, b in delivery.by_user.items()} == users
    for user in {f"rooms-{n}" for n in range(USERS)}:
        assert await app.presence.count(user) == users.get(user, 0), user
    live = {s for s in app.sio.eio.sockets.values() if not s.closed}
    assert len(live) == len(open_)

    # every socket's last connections.count is its user's count (counts arrive after changes)
    def counted() -> bool:
        for sid, (user, sock) in open_.items():
            counts = sock.of("connections.count")
            if not counts or counts[-1]["count"] != users[user]:
                return False
        return True
    await wait_until(lambda: _async(counted()), timeout=30)


@pytest.mark.asyncio
async def test_random_churn_leaves_exactly_the_connected_sockets(droid):
    open_ = await _churn(droid, seed=21)
    try:
        await _check(droid, open_)
    finally:
        await asyncio.gather(*(sock.close() for _, sock in open_.values()))
    await wait_until(lambda: _async(not droid.gateway.sockets), timeout=30)
    assert not droid.sio.manager.extra_rooms and not droid.sio.manager.rooms


@pytest.mark.asyncio
async def test_random_churn_with_redis_presence(droid_factory, redis_server):  # noqa: F811
    droid = await droid_factory(REDIS_URL=redis_server.url)
    open_ = await _churn(droid, seed=2121)
    try:
        await _check(droid, open_)
    finally:
        await asyncio.gather(*(sock.close() for _, sock in open_.values()))
