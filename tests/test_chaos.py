"""Nothing lost: clients that come and go at random still end with every envelope exactly once.

50 clients of 10 users connect, disconnect and reconnect at random (some by killing their TCP
connection without a goodbye), each time resuming with `auth.lastSeq`, while 2,000 task events
are published. At the end every client holds every envelope of its user exactly once, in order;
on one instance, and on two instances sharing one database and Redis.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from conftest import Api, publish_event
from rawsio import RawSocket
from redis_server import redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

USERS = 10
CLIENTS_PER_USER = 5
EVENTS = 2000


class ChaosClient:
    """One logical client (a browser tab) across many connections."""

    def __init__(self, user: dict, urls: list[str], rng: random.Random) -> None:
        self.user = user
        self.urls = urls
        self.rng = rng
        self.held: list[dict] = []      # task.event envelopes, in arrival order
        self.specific: list[int] = []   # seqs of the specific events, in arrival order
        self.connections = 0
        self.kills = 0

    @property
    def last_seq(self) -> int:
        # The highest seq seen on either event: a connection cut between an envelope's specific
        # event and its task.event resumes after it, so that neither arrives twice.
        held = self.held[-1]["seq"] if self.held else 0
        return max(held, self.specific[-1] if self.specific else 0)

    def _absorb(self, sock: RawSocket, start: int) -> int:
        for event, data in sock.events[start:]:
            if event == "task.event":
                self.held.append(data)
            elif event.startswith("task.") and isinstance(data, dict) and data.get("seq"):
                self.specific.append(data["seq"])
        return len(sock.events)

    async def session(self, until: asyncio.Event | None, expect: int | None = None) -> None:
        sock = RawSocket(self.rng.choice(self.urls))
        await sock.open({"token": self.user["token"], "lastSeq": self.last_seq})
        self.connections += 1
        seen = 0
        try:
            if expect is not None:
                try:
                    await sock.wait_for(lambda: sum(1 for e, d in sock.events
                                                    if e == "task.created")
                                        + len(self.specific) >= expect, timeout=30)
                except asyncio.TimeoutError:
                    pass  # the assertions at the end say what is missing
            else:
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        finally:
            seen = self._absorb(sock, seen)
            if expect is None and self.rng.random() < 0.4:
                self.kills += 1
                sock.kill()
            else:
                await sock.close()

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            await self.session(done)
            await asyncio.sleep(self.rng.uniform(0, 0.05))


async def _chaos(apps, seed: int) -> None:
    rng = random.Random(seed)
    api = Api(apps[0].url)
    users = [await api.register() for _ in range(USERS)]
    api.close()
    urls = [a.url for a in apps]
    clients = [ChaosClient(u, urls, random.Random(rng.random()))
               for u in users for _ in range(CLIENTS_PER_USER)]
    done = asyncio.Event()
    runners = [asyncio.ensure_future(c.run(done)) for c in clients]

    async def publisher(k: int) -> None:
        for i in range(k, EVENTS, 4):
            user = users[i % USERS]
            app = apps[(i // USERS) % len(apps)]  # a user's envelopes alternate instances
            await publish_event(app, user["id"], "task.created",
                                {"taskId": f"t{i}", "userId": user["id"], "n": i})
            await asyncio.sleep(0)  # let sockets in between publishes

    await asyncio.gather(*[publisher(k) for k in range(4)])
    done.set()
    await asyncio.gather(*runners)
    per_user = EVENTS // USERS
    # One last resume each, which must bring every client up to date.
    await asyncio.gather(*[c.session(None, expect=per_user) for c in clients])
    assert sum(c.kills for c in clients) > 0 and sum(c.connections for c in clients) > 2 * len(clients)
    for client in clients:
        seqs = [e["seq"] for e in client.held]
        # Every envelope exactly once and in order; task.event may lack only an envelope whose
        # connection was cut between its two events (the client resumes after what it saw).
        assert client.specific == list(range(1, per_user + 1)), (client.user["id"], client.specific[:20])
        assert seqs == sorted(set(seqs)) and len(seqs) >= per_user - client.connections
        assert all(e["data"]["userId"] == client.user["id"] for e in client.held)


async def test_chaos_on_one_instance(droid_factory):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    await _chaos([app], seed=1)


async def test_chaos_on_two_instances_sharing_redis(droid_factory, redis_server):
    """The same over two instances with one database and Redis: each client reconnects to
    either instance at random, and the publishers alternate instances too, so envelopes of one
    user are numbered by both and reach each socket partly through Redis, partly locally."""
    apps = [await droid_factory(WORKER_CONCURRENCY=0, REDIS_URL=redis_server.url)
            for _ in range(2)]
    await _chaos(apps, seed=2)
