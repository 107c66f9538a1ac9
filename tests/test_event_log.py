"""Stored envelopes over REST (GET /events) and Server-Sent Events (GET /events/stream)."""
import asyncio

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import Api
from droid.util import loads

pytestmark = pytest.mark.asyncio


async def _tasks(api: Api, token: str, n: int) -> list[dict]:
    return [(await api.post("/tasks", {"prompt": f"t{i}"}, token=token)).body for i in range(n)]


async def test_events_page_returns_the_callers_envelopes_after_a_seq(droid_factory):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    alice, bob = await api.register(), await api.register()
    tasks = await _tasks(api, alice["token"], 3)
    await api.post(f"/tasks/{tasks[0]['id']}/cancel", token=alice["token"])
    await _tasks(api, bob["token"], 2)
    page = await api.get("/events", token=alice["token"])
    assert page.status == 200
    seqs = [e["seq"] for e in page.body["items"]]
    assert seqs == [1, 2, 3, 4] and page.body["lastSeq"] == 4
    assert [e["event"] for e in page.body["items"]] == ["task.created"] * 3 + ["task.cancelled"]
    assert all(e["data"]["userId"] == alice["id"] for e in page.body["items"])
    after = await api.get("/events?after=2&limit=1", token=alice["token"])
    assert [e["seq"] for e in after.body["items"]] == [3]
    empty = await api.get("/events?after=4", token=alice["token"])
    assert empty.body == {"items": [], "lastSeq": 4}
    bobs = await api.get("/events", token=bob["token"])
    assert [e["seq"] for e in bobs.body["items"]] == [1, 2]
    for bad in ("after=-1", "after=x", "limit=0", "limit=5000"):
        assert (await api.get(f"/events?{bad}", token=alice["token"])).status == 400
    api.close()


class SSE:
    """A streaming SSE reader over Tornado's real HTTP client."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.done: asyncio.Future | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict = {}
            for line in block.decode().splitlines():
                if line.startswith(":") or ":" not in line:
                    continue
                name, value = line.split(":", 1)
                fields[name] = value[1:] if value.startswith(" ") else value
            if "data" in fields:
                self.events.append(fields)
                self.changed.set()

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        async def loop():
            while len(self.events) < n:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)


def _open(url: str, token: str, headers: dict | None = None) -> tuple[SSE, asyncio.Future]:
    sse = SSE()
    client = AsyncHTTPClient(force_instance=True)
    request = HTTPRequest(url, headers={"Authorization": f"Bearer {token}", **(headers or {})},
                          streaming_callback=sse.feed, request_timeout=30)
    future = asyncio.ensure_future(client.fetch(request, raise_error=False))
    return sse, future


async def test_sse_streams_live_envelopes_and_resumes_after_last_event_id(droid_factory):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    first = await _tasks(api, user["token"], 2)
    sse, fut = _open(app.url + "/events/stream", user["token"])
    await sse.wait_count(2)
    await api.post(f"/tasks/{first[0]['id']}/cancel", token=user["token"])
    await sse.wait_count(3)
    assert [e["id"] for e in sse.events] == ["1", "2", "3"]
    assert [e["event"] for e in sse.events] == ["task.created", "task.created", "task.cancelled"]
    fut.cancel()
    # Resume from Last-Event-ID: only what came after, then live.
    await _tasks(api, user["token"], 1)
    resumed, fut2 = _open(app.url + "/events/stream", user["token"], {"Last-Event-ID": "2"})
    await resumed.wait_count(2)
    assert [e["id"] for e in resumed.events] == ["3", "4"]
    await _tasks(api, user["token"], 1)
    await resumed.wait_count(3)
    assert resumed.events[-1]["id"] == "5"
    fut2.cancel()
    by_query, fut3 = _open(app.url + "/events/stream?after=4", user["token"])
    await by_query.wait_count(1)
    assert [e["id"] for e in by_query.events] == ["5"]
    fut3.cancel()
    api.close()


async def test_sse_carries_live_progress_without_an_id_between_the_stored_envelopes(droid):
    """task.progress is live only: it comes as it is published, without `id:` (so that
    Last-Event-ID stays the last stored seq), between task.processing and task.completed."""
    api = Api(droid.url)
    user = await api.register()
    sse, fut = _open(droid.url + "/events/stream", user["token"], {"Last-Event-ID": "0"})
    task = (await api.post("/tasks", {"prompt": "stream me"}, token=user["token"])).body
    await sse.wait_count(1)
    await asyncio.wait_for(_until(sse, lambda: any(
        e["event"] == "task.completed" for e in sse.events)), 10)
    fut.cancel()
    names = [e["event"] for e in sse.events]
    assert names[0] == "task.created" and names[-1] == "task.completed", names
    progress = [e for e in sse.events if e["event"] == "task.progress"]
    assert len(progress) >= 2 and all("id" not in e for e in progress), sse.events
    assert all("id" in e for e in sse.events if e["event"] != "task.progress")
    pieces = [loads(e["data"])["data"]["delta"] for e in progress]
    completed = loads(sse.events[-1]["data"])
    assert "".join(pieces) == completed["data"]["response"]
    assert {loads(e["data"])["data"]["taskId"] for e in progress} == {task["id"]}
    assert names.index("task.processing") < names.index("task.progress")
    api.close()


async def _until(sse: SSE, predicate) -> None:
    while not predicate():
        sse.changed.clear()
        await sse.changed.wait()


async def test_sse_says_resync_when_the_resume_point_is_older_than_what_is_kept(droid_factory,
                                                                              monkeypatch):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    # Missing seqs this recent could be in flight (numbered, not stored yet): the stream waits
    # that long for them before it says resync.
    monkeypatch.setattr("droid.tasks.history.GAP_GIVE_UP_S", 0.4)
    api = Api(app.url)
    user = await api.register()
    await _tasks(api, user["token"], 6)
    await app.store.delete_events(user["id"], 3)
    stale, fut = _open(app.url + "/events/stream", user["token"], {"Last-Event-ID": "1"})
    await stale.wait_count(4)
    fut.cancel()
    assert stale.events[0]["event"] == "resync" and "id" not in stale.events[0]
    assert loads(stale.events[0]["data"]) == {"oldestSeq": 4}
    assert [e["id"] for e in stale.events[1:]] == ["4", "5", "6"]  # then what is kept
    # Nothing is missing after 3, and a stream that names no resume point starts at what is
    # kept without a resync.
    for url, headers in ((app.url + "/events/stream", {"Last-Event-ID": "3"}),
                         (app.url + "/events/stream", {})):
        fresh, fut = _open(url, user["token"], headers)
        await fresh.wait_count(3)
        fut.cancel()
        assert [e["event"] for e in fresh.events] == ["task.created"] * 3, fresh.events
    await app.store.delete_events(user["id"])
    gone, fut = _open(app.url + "/events/stream?after=2", user["token"])
    await gone.wait_count(1)
    assert loads(gone.events[0]["data"]) == {"oldestSeq": 7}
    await _tasks(api, user["token"], 1)
    await gone.wait_count(2)
    fut.cancel()
    assert gone.events[1]["id"] == "7"
    api.close()


async def test_sse_accepts_a_token_query_parameter_and_refuses_without_one(droid):
    api = Api(droid.url)
    user = await api.register()
    await _tasks(api, user["token"], 1)
    sse = SSE()
    client = AsyncHTTPClient(force_instance=True)
    fut = asyncio.ensure_future(client.fetch(HTTPRequest(
        droid.url + f"/events/stream?token={user['token']}", streaming_callback=sse.feed,
        request_timeout=30), raise_error=False))
    await sse.wait_count(1)
    fut.cancel()
    refused = await api.get("/events/stream")
    assert refused.status == 401 and refused.body["message"] == "Authentication required"
    bad = await api.get("/events/stream", token=user["token"], headers={"Last-Event-ID": "abc"})
    assert bad.status == 400
    api.close()


async def test_metrics_are_prometheus_text(droid_factory, listen):
    app = await droid_factory()
    api = Api(app.url)
    user = await api.register()
    sock = await listen(app.url, user["token"])
    await _tasks(api, user["token"], 1)
    await sock.next("task.completed")
    reply = await api.get("/metrics")  # open on loopback in test; METRICS_TOKEN: test_http.py
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body
    assert 'droid_tasks{status="completed"} 1.0' in text
    assert "droid_socket_connections 1.0" in text
    assert 'droid_events_emitted_total{event="task.created"}' in text
    assert "droid_attempt_seconds_bucket" in text and "droid_queue_depth" in text
    api.close()
