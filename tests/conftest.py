"""Shared fixtures: real Droid servers on ephemeral ports, real HTTP and Socket.IO clients.

The database is the embedded SQLite store in a file of the test's temporary folder, or a real
MongoDB when DROID_TEST_MONGODB_URI is set (each test then gets its own database, dropped
afterwards).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
import socketio
import tornado.testing
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from droid.app import Droid, make_app
from droid.config import load_config
from droid.store import Store
from droid.store.mongo import MongoStore
from droid.store.sqlite import SqliteStore
from droid.util import dumps, loads, now_iso, utcnow

import mongo_server
import pytest_timeout


TEST_SECRET = "test-secret-that-is-at-least-32-bytes-long!"
ISO_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


_timeout_sigalrm = pytest_timeout.timeout_sigalrm


def _timed_out(item, settings):
    """A test over its timeout (setup.cfg) fails with where each of its coroutines waits: the
    main thread's stack, all pytest-timeout prints, ends in the event loop's select."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}", file=sys.stderr)
            task.print_stack(limit=12, file=sys.stderr)
    _timeout_sigalrm(item, settings)


pytest_timeout.timeout_sigalrm = _timed_out


# The tests run on the event loop `python -m droid` runs on by default (DROID_EVENT_LOOP=auto:
# uvloop, installed with droid); DROID_TEST_EVENT_LOOP=asyncio runs them on asyncio's own loop.
# tests/test_event_loop.py starts real processes on each.
TEST_EVENT_LOOP = os.environ.get("DROID_TEST_EVENT_LOOP", "uvloop")


def pytest_asyncio_loop_factories(config, item):
    if TEST_EVENT_LOOP == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop
    return {"uvloop": uvloop.new_event_loop}


def make_config(**env: Any):
    """A Config for tests: fixed JWT key, loopback, a fast demo agent, short leases."""
    base = {"HOST": "127.0.0.1", "PORT": "0", "JWT_SECRET": TEST_SECRET, "LOG_LEVEL": "INFO",
            "DROID_DEMO_DELAY_S": "0.05", "DROID_RETRY_BACKOFF_S": "0.05",
            "WORKER_CONCURRENCY": "4", "DROID_ENV": "test"}
    base.update({k: str(v) for k, v in env.items()})
    return load_config(base, dotenv_path=None)


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A MongoDB server for the session: DROID_TEST_MONGODB_URI, else a SecantusDB process
    (tests/mongo_server.py). Fails, never skips, when SecantusDB is not installed."""
    with contextlib.ExitStack() as stack:
        try:
            uri = stack.enter_context(mongo_server.mongodb_uri())
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield uri


@pytest.fixture(scope="session")
def mongo_standalone_uri() -> Iterator[str]:
    """A MongoDB server without transactions: a SecantusDB process started as a standalone
    server. With DROID_TEST_MONGODB_URI set, that server, and the tests make their MongoStore
    act as on one without transactions (MongoStore(..., transactions=False))."""
    with contextlib.ExitStack() as stack:
        try:
            uri = stack.enter_context(mongo_server.mongodb_uri(standalone=True))
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield uri


@pytest_asyncio.fixture
async def shared_store(tmp_path) -> AsyncIterator[Store]:
    """One database for every app of a test (apps are given it and do not close it)."""
    uri = os.environ.get("DROID_TEST_MONGODB_URI")
    if uri:
        store: Store = MongoStore(uri, f"droid_test_{uuid.uuid4().hex[:12]}")
    else:
        store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    yield store
    if uri:
        await store.drop()
    await store.close()


@pytest_asyncio.fixture
async def droid_factory(shared_store: Store) -> AsyncIterator[Callable[..., Awaitable[Droid]]]:
    """Start Droid instances (sharing the test's database); all are stopped at the end."""
    started: list[Droid] = []

    async def start(provider: Any = None, **env: Any) -> Droid:
        app = await make_app(make_config(**env), store=shared_store, provider=provider)
        sock, _ = tornado.testing.bind_unused_port()
        await app.start([sock])
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        await app.stop()


@pytest_asyncio.fixture
async def droid(droid_factory) -> Droid:
    return await droid_factory()


@dataclasses.dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def message(self) -> Any:
        return self.body.get("message") if isinstance(self.body, dict) else None


class Api:
    """A small JSON client over Tornado's real HTTP client."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = AsyncHTTPClient(force_instance=True)

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      raw: bytes | None = None, headers: dict | None = None) -> Reply:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (dumps(body) if body is not None else None)
        if method == "POST" and data is None:
            data = b""
        resp = await self.http.fetch(HTTPRequest(self.base + path, method=method, body=data,
                                                 headers=hdrs, request_timeout=20),
                                     raise_error=False)
        text = resp.body or b""
        ctype = resp.headers.get("Content-Type", "")
        parsed = loads(text) if text and "json" in ctype else text.decode(errors="replace")
        return Reply(resp.code, parsed, resp.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def register(self, email: str | None = None, password: str = "correct horse") -> dict:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        reply = await self.post("/auth/register", {"email": email, "password": password})
        assert reply.status == 201, reply.body
        return {**reply.body["user"], "token": reply.body["accessToken"], "password": password}

    def close(self) -> None:
        self.http.close()


@pytest_asyncio.fixture
async def api(droid: Droid) -> AsyncIterator[Api]:
    client = Api(droid.url)
    yield client
    client.close()


class Listener:
    """A python-socketio client on /events that records every event it receives."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        self.client.on("*", self._record, namespace="/events")
        self.connect_error: Any = None
        self.client.on("connect_error", self._on_error, namespace="/events")

    async def _record(self, event: str, data: Any = None) -> None:
        self.events.append((event, data))
        self._changed.set()

    async def _on_error(self, data: Any = None) -> None:
        self.connect_error = data

    async def connect(self, url: str, token: str | None = None, *, auth: dict | None = None,
                      transports: list[str] | None = None, **kw: Any) -> "Listener":
        if auth is None and token is not None:
            auth = {"token": token}
        await self.client.connect(url, namespaces=["/events"], auth=auth,
                                  transports=transports or ["websocket"], wait_timeout=5, **kw)
        return self

    def of(self, name: str) -> list[Any]:
        return [d for e, d in self.events if e == name]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        async def loop() -> Any:
            while True:
                value = predicate()
                if value:
                    return value
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(loop(), timeout)

    async def next(self, name: str, timeout: float = 5.0, where: Callable[[Any], bool] | None = None,
                   start: int = 0) -> Any:
        def found() -> Any:
            for data in self.of(name)[start:]:
                if where is None or where(data):
                    return [data]
            return None
        return (await self.wait_for(found, timeout))[0]

    async def close(self) -> None:
        if self.client.connected:
            await self.client.disconnect()


@pytest_asyncio.fixture
async def listen() -> AsyncIterator[Callable[..., Awaitable[Listener]]]:
    """Connect recording Socket.IO clients; all are disconnected at the end."""
    made: list[Listener] = []

    async def connect(url: str, token: str | None = None, **kw: Any) -> Listener:
        listener = Listener()
        made.append(listener)
        return await listener.connect(url, token, **kw)

    yield connect
    for listener in made:
        await listener.close()


async def publish_event(app: Droid, user_id: str, event: str, data: dict) -> dict:
    """Store an envelope of any shape for the user (numbered with the next seq) and deliver it,
    as the task service does with the envelope of a task's change once it is stored."""
    envelope = {"event": event, "data": data, "timestamp": now_iso(), "seq": None}
    await app.store.append_event(user_id, event, envelope, utcnow())
    await app.events.publish(user_id, envelope)
    return envelope


async def wait_until(predicate: Callable[[], Awaitable[Any]], timeout: float = 5.0,
                     interval: float = 0.02) -> Any:
    """Poll an async predicate until it is truthy (for state that has no event to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
