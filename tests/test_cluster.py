"""Several Droid instances in one test process, one event stream through a real Redis.

Every instance here has its own HTTP server, Socket.IO server and worker, and they share one
database (the `droid_factory` fixture); Redis is a real redis-server the test starts on a free
port, and stops and restarts when the test is about Redis going away.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
import socketio

from conftest import Api, Listener, make_config, wait_until
from droid.app import Droid
from droid.realtime.gateway import MAX_SOCKETS_PER_USER
from redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

TTL_S = 3.0                      # DROID_PRESENCE_TTL_S here (a loaded CI box stalls for 1 s)
HEARTBEAT_S = TTL_S / 3
BOUND_S = TTL_S + HEARTBEAT_S    # a vanished instance stops being counted within this
SLACK_S = 1.0                    # delivery and scheduling on a loaded machine


def require_ttl_setting() -> None:
    """The tests about vanished instances shorten the TTL with DROID_PRESENCE_TTL_S."""
    ttl = getattr(make_config(DROID_PRESENCE_TTL_S=TTL_S), "presence_ttl_s", None)
    assert ttl == TTL_S, "droid/config.py must read DROID_PRESENCE_TTL_S into Config.presence_ttl_s"


@pytest_asyncio.fixture
async def cluster(redis_server: RedisServer, droid_factory) -> Callable[..., Any]:
    """Start an instance joined to the test's Redis (which outlives the instances)."""
    async def start(**env: Any) -> Droid:
        return await droid_factory(REDIS_URL=redis_server.url, DROID_PRESENCE_TTL_S=TTL_S, **env)
    return start


@pytest_asyncio.fixture
async def api_for() -> AsyncIterator[Callable[[Droid], Api]]:
    """An HTTP client per instance."""
    clients: dict[str, Api] = {}

    def get(app: Droid) -> Api:
        if app.url not in clients:
            clients[app.url] = Api(app.url)
        return clients[app.url]

    yield get
    for client in clients.values():
        client.close()


def counts(listener: Listener) -> list[int]:
    return [d["count"] for d in listener.of("connections.count")]


async def settle_count(listeners: list[Listener], n: int, timeout: float = 5.0) -> None:
    """Wait until the last `connections.count` each listener received is n."""
    for listener in listeners:
        try:
            await listener.wait_for(lambda: counts(listener)[-1:] == [n], timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"counts {[counts(x) for x in listeners]}, expected {n} last")


def of_task(listener: Listener, task_id: str) -> list[dict]:
    """The task's stored envelopes this listener received (streamed `task.progress` left out)."""
    return [e for e in listener.of("task.event")
            if e["data"]["taskId"] == task_id and e["event"] != "task.progress"]


async def finished(listener: Listener, task_id: str, timeout: float = 10.0) -> list[dict]:
    """Wait for the task's `task.completed` envelope; return all its envelopes, in order."""
    await listener.wait_for(
        lambda: any(e["event"] == "task.completed" for e in of_task(listener, task_id)), timeout)
    return of_task(listener, task_id)


@pytest.mark.parametrize("worker", ["on the creating instance", "on the listening instance"])
async def test_events_of_a_task_created_on_one_instance_reach_sockets_on_another(
        cluster, listen, api_for, worker):
    on_creator = worker == "on the creating instance"
    a = await cluster(WORKER_CONCURRENCY=0 if on_creator else 4)
    b = await cluster(WORKER_CONCURRENCY=4 if on_creator else 0)
    user = await api_for(b).register()
    sock = await listen(a.url, user["token"])
    await settle_count([sock], 1)

    reply = await api_for(b).post("/tasks", {"prompt": "hello there"}, token=user["token"])
    assert reply.status == 201, reply.body
    envelopes = await finished(sock, reply.body["id"])

    assert [e["event"] for e in envelopes] == ["task.created", "task.processing", "task.completed"]
    seqs = [e["seq"] for e in envelopes]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert [e["seq"] for e in sock.of("task.completed")] == [seqs[2]]
    # b has no socket at all, yet what it published (task.created at least) reached a's socket.
    assert b.gateway.sockets == {}


async def test_connection_counts_span_instances(cluster, listen, api_for):
    a = await cluster()
    b = await cluster()
    user = await api_for(a).register()
    other = await api_for(a).register()
    s1 = await listen(a.url, user["token"])
    await settle_count([s1], 1)
    s2 = await listen(b.url, user["token"])
    await settle_count([s1, s2], 2)
    s3 = await listen(a.url, user["token"])
    await settle_count([s1, s2, s3], 3)
    assert await a.presence.count(user["id"]) == await b.presence.count(user["id"]) == 3

    o1 = await listen(b.url, other["token"])
    await settle_count([o1], 1)
    assert await a.presence.total() == await b.presence.total() == 4

    await s2.close()
    await settle_count([s1, s3], 2)
    assert await a.presence.count(user["id"]) == await b.presence.count(user["id"]) == 2
    # Nobody was told another user's count.
    assert set(counts(s1)) <= {1, 2, 3} and set(counts(o1)) == {1}


async def test_sockets_connecting_at_once_to_several_instances_all_end_on_the_right_count(
        cluster, listen, api_for):
    # What a deploy causes: every tab of a user reconnects at the same moment, to any instance.
    # Counts published as values can cross on the way and leave a socket on a stale one.
    a = await cluster()
    b = await cluster()
    user = await api_for(a).register()
    sockets = await asyncio.gather(*(listen((a, b)[i % 2].url, user["token"]) for i in range(8)))
    await settle_count(list(sockets), 8)
    await asyncio.gather(*(s.close() for s in sockets[:3]))
    await settle_count(list(sockets[3:]), 5)


async def test_the_socket_limit_is_per_user_over_all_instances(cluster, listen, api_for):
    a = await cluster()
    b = await cluster()
    user = await api_for(a).register()
    for i in range(MAX_SOCKETS_PER_USER):
        await listen((a if i % 2 else b).url, user["token"])
    extra = Listener()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await extra.connect(a.url, user["token"])
    assert extra.connect_error["message"] == "Too many connections"
    assert await b.presence.count(user["id"]) == MAX_SOCKETS_PER_USER


async def test_counts_are_right_again_after_an_instance_vanishes(cluster, listen, api_for):
    require_ttl_setting()
    a = await cluster()
    b = await cluster()
    user = await api_for(a).register()
    s1 = await listen(a.url, user["token"])
    await settle_count([s1], 1)
    s2 = await listen(b.url, user["token"])
    await settle_count([s1, s2], 2)

    # b freezes, as a process that hangs or is killed does: no heartbeat, no goodbye.
    b.presence._task.cancel()
    loop = asyncio.get_running_loop()
    frozen_at = loop.time()
    await s1.wait_for(lambda: counts(s1)[-1] == 1, timeout=BOUND_S + SLACK_S + 2)
    took = loop.time() - frozen_at

    print(f"count corrected {took:.2f} s after the freeze (bound {BOUND_S:.1f} s)")
    assert took <= BOUND_S + SLACK_S, took
    assert await a.presence.count(user["id"]) == 1


async def test_redis_going_away_and_coming_back(cluster, listen, api_for, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="droid.cluster")
    a = await cluster(WORKER_CONCURRENCY=4)
    b = await cluster(WORKER_CONCURRENCY=0)
    user = await api_for(a).register()
    s1 = await listen(a.url, user["token"])
    await settle_count([s1], 1)
    s2 = await listen(b.url, user["token"])
    await settle_count([s1, s2], 2)
    assert (await api_for(a).get("/health")).body["redis"] == "ok"

    redis_server.stop()
    # Local delivery goes on: a's socket sees every event of a's tasks, for as long as it takes
    # a to fail publishing twice (it retries once a second).
    offline: list[str] = []
    while len(offline) < 3 or a.sio.manager.publish_failures < 2:
        assert len(offline) < 100, "a never retried publishing"
        reply = await api_for(a).post("/tasks", {"prompt": f"offline {len(offline)}"},
                                      token=user["token"])
        assert reply.status == 201, reply.body
        offline.append(reply.body["id"])
        envelopes = await finished(s1, offline[-1])
        assert [e["event"] for e in envelopes] == ["task.created", "task.processing",
                                                   "task.completed"]
    lost = [r for r in caplog.records
            if r.name == "droid.cluster" and "unavailable for publishing" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]  # once, not once per event or attempt
    health = await api_for(a).get("/health")
    assert (health.status, health.body["db"], health.body["redis"]) == (200, "ok", "down")
    # Counts fall back to this instance's own sockets.
    s3 = await listen(a.url, user["token"])
    await settle_count([s1, s3], 2)

    redis_server.start()
    await wait_until(lambda: _both_subscribed(a, b), timeout=10)
    reply = await api_for(a).post("/tasks", {"prompt": "back online"}, token=user["token"])
    envelopes = await finished(s2, reply.body["id"])
    assert [e["event"] for e in envelopes] == ["task.created", "task.processing", "task.completed"]
    # Each instance registers again and sends its users their counts over all instances.
    await settle_count([s1, s2, s3], 3, timeout=BOUND_S + SLACK_S + 2)
    assert await b.presence.count(user["id"]) == 3
    assert (await api_for(a).get("/health")).body["redis"] == "ok"
    # What was published while Redis was away reached b's socket when it was back (b looked in
    # the event store when it subscribed again): every envelope once, in seq order.
    for task_id in offline:
        assert [e["event"] for e in of_task(s2, task_id)] == [
            "task.created", "task.processing", "task.completed"]
    seqs = [e["seq"] for e in s2.of("task.event") if e["seq"] is not None]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    messages = [r.getMessage() for r in caplog.records if r.name == "droid.cluster"]
    assert sum("back for publishing" in m for m in messages) == 1, messages
    assert sum("back for receiving" in m for m in messages) == 2, messages


async def _both_subscribed(*apps: Droid) -> bool:
    return all(app.sio.manager.subscribed for app in apps)


async def test_an_instance_started_while_redis_is_down_joins_when_it_comes_up(
        cluster, listen, api_for, redis_server, caplog):
    redis_server.stop()
    a = await cluster(WORKER_CONCURRENCY=0)
    assert any("not reachable at start-up" in r.getMessage() for r in caplog.records)
    health = await api_for(a).get("/health")
    assert (health.status, health.body["redis"]) == (200, "down")
    user = await api_for(a).register()
    s1 = await listen(a.url, user["token"])
    await settle_count([s1], 1)

    redis_server.start()
    b = await cluster(WORKER_CONCURRENCY=4)
    await wait_until(lambda: _both_subscribed(a, b), timeout=10)
    reply = await api_for(b).post("/tasks", {"prompt": "hello"}, token=user["token"])
    await finished(s1, reply.body["id"])
    s2 = await listen(b.url, user["token"])
    await settle_count([s1, s2], 2, timeout=BOUND_S + SLACK_S + 2)
