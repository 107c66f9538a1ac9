"""The /events namespace with the official JavaScript client (socket.io-client 4.x under node),
the original document's two client examples run as written, and the REST-to-socket latency.

Node runs tests/js/driver.js, a remote control for the client: the test sends it commands and
reads back everything its sockets see. Each node process has a hard deadline and runs under
`timeout`; the tests fail (never skip) when node, its packages or Chromium are missing.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
import tornado.testing
import tornado.web
from tornado.httpserver import HTTPServer

from conftest import ISO_RE, Api
from test_events import EVENT_FIELDS, TASK_FIELDS, check_envelope, mint

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
PAGES_DIR = ROOT / "tests" / "pages"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DEADLINE_S = 30


def node_command(*args: str) -> list[str]:
    node = shutil.which("node")
    assert node, "node is not installed: these tests need Node.js 18+ (see tests/run)"
    assert (JS_DIR / "node_modules" / "socket.io-client").is_dir(), \
        "tests/js/node_modules is missing: run `npm ci` in tests/js (tests/run does it)"
    return [shutil.which("timeout") or "timeout", "-k", "2", str(DEADLINE_S + 5), node,
            "--require", "./deadline.cjs", *args]


class Node:
    """A node process whose stdout lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict | None = None) -> "Node":
        proc = await asyncio.create_subprocess_exec(
            *node_command(*args), cwd=JS_DIR, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # one process group: `timeout` and node die together
            env={**os.environ, "DEADLINE_MS": str(DEADLINE_S * 1000), **(env or {})})
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def loop() -> Any:
            while True:
                value = predicate()
                if value:
                    return value
                if self._reader.done():
                    raise AssertionError(f"node exited: {await self.stderr()}")
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(loop(), timeout)

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        try:
            return (await asyncio.wait_for(self.proc.stderr.read(), 2)).decode()
        except asyncio.TimeoutError:
            return "(stderr still open)"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await self.proc.wait()
        await asyncio.wait_for(asyncio.gather(self._reader, return_exceptions=True), 5)


class Driver(Node):
    """tests/js/driver.js: sockets of the official client, opened and used on command."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__(proc)
        self._refs = 0

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    @property
    def records(self) -> list[dict]:
        records = [json.loads(line) for line in self.lines]
        errors = [r for r in records if r["type"] == "error"]
        assert not errors, errors
        return records

    def open(self, url: str, **opts: Any) -> "JsSocket":
        self._refs += 1
        sock = JsSocket(self, f"socket{self._refs}")
        self.send(cmd="open", id=sock.id, url=url, opts=opts)
        return sock

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.send(cmd="exit")
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                pass
        await super().stop()


class JsSocket:
    """One socket of the JavaScript client, seen through the driver's records."""

    def __init__(self, driver: Driver, id: str) -> None:
        self.driver, self.id = driver, id

    @property
    def records(self) -> list[dict]:
        return [r for r in self.driver.records if r.get("id") == self.id]

    def of(self, name: str) -> list[Any]:
        """The first argument of each `name` event received, in order."""
        return [r["args"][0] if r["args"] else None for r in self.records
                if r["type"] == "event" and r["name"] == name]

    async def next(self, name: str, where: Callable[[Any], bool] | None = None,
                   timeout: float = 10.0) -> Any:
        def found() -> Any:
            for data in self.of(name):
                if where is None or where(data):
                    return [data]
            return None
        return (await self.driver.wait_for(found, timeout))[0]

    async def record(self, kind: str, timeout: float = 10.0) -> dict:
        return await self.driver.wait_for(
            lambda: next((r for r in self.records if r["type"] == kind), None), timeout)

    async def connected(self) -> dict:
        """Wait for `connect`, then `connected`; return the `connected` data."""
        await self.driver.wait_for(lambda: any(r["type"] in ("connect", "connect_error")
                                               for r in self.records))
        error = next((r for r in self.records if r["type"] == "connect_error"), None)
        assert error is None, error
        return await self.next("connected")

    async def refusal(self) -> dict:
        error = await self.record("connect_error")
        return {"message": error["message"], "data": error["data"]}

    def emit(self, event: str, *args: Any) -> None:
        self.driver.send(cmd="emit", id=self.id, event=event, args=list(args))

    async def call(self, event: str, *args: Any) -> list:
        """Emit with an acknowledgement callback; return the arguments it was called with."""
        ref = self.driver._refs = self.driver._refs + 1
        self.driver.send(cmd="emit", id=self.id, event=event, args=list(args), ack=ref)
        reply = await self.driver.wait_for(lambda: next(
            (r for r in self.records if r["type"] == "ack" and r["ref"] == ref), None))
        assert reply["error"] is None, reply
        return reply["args"]

    def close(self) -> None:
        self.driver.send(cmd="close", id=self.id)


@pytest_asyncio.fixture
async def js() -> AsyncIterator[Driver]:
    driver = await Driver.start("driver.js")
    yield driver
    await driver.stop()


def events_url(app) -> str:
    return app.url + "/events"


async def finished(sock: JsSocket, task_id: str, event: str = "task.completed") -> dict:
    return await sock.next("task.event", lambda e: e["event"] == event
                           and e["data"]["taskId"] == task_id)


# authentication and namespaces ----------------------------------------------------------------

async def test_every_way_of_sending_the_token(droid, api, js):
    user = await api.register()
    token = user["token"]
    ways = {
        "auth": {"auth": {"token": token}},
        "auth-bearer": {"auth": {"token": f"Bearer {token}"}},
        "header": {"extraHeaders": {"Authorization": f"Bearer {token}"}},
        "query": {"query": {"token": token}},
    }
    sockets = {}
    for name, opts in ways.items():
        for transports in (["polling", "websocket"], ["websocket"]):
            sockets[name, transports[0]] = js.open(events_url(droid), transports=transports,
                                                   **opts)
    for (name, first), sock in sockets.items():
        hello = await sock.connected()
        assert hello["userId"] == user["id"], name
        assert (await sock.record("open"))["transport"] == first


async def test_refusals_carry_message_and_data_code(droid, js):
    cases = {
        "Authentication required": {},
        "Token expired": {"auth": {"token": mint("someone", expires_in=-60)}},
        "Invalid token": {"auth": {"token": "not-a-jwt"}},
    }
    sockets = {message: js.open(events_url(droid), **opts) for message, opts in cases.items()}
    for message, sock in sockets.items():
        assert await sock.refusal() == {"message": message, "data": {"code": 401}}
    assert not droid.gateway.sockets


async def test_other_namespaces_are_refused(droid, api, js):
    user = await api.register()
    root = js.open(droid.url, auth={"token": user["token"]})
    other = js.open(droid.url + "/other", auth={"token": user["token"]})
    assert await root.refusal() == {"message": "Invalid namespace", "data": None}
    assert await other.refusal() == {"message": "Invalid namespace", "data": None}


# presence and client events -------------------------------------------------------------------

async def test_connect_comes_before_connected_and_two_tabs_are_counted(droid, api, js):
    user = await api.register()
    first = js.open(events_url(droid), auth={"token": user["token"]})
    hello = await first.connected()
    kinds = [(r["type"], r.get("name")) for r in first.records if r["type"] != "upgrade"]
    assert kinds[:3] == [("open", None), ("connect", None), ("event", "connected")]
    assert hello["clientId"] == (await first.record("connect"))["sid"]
    assert re.match(ISO_RE, hello["timestamp"])
    assert await first.next("connections.count") == {"count": 1}

    second = js.open(events_url(droid), auth={"token": user["token"]})
    await second.connected()
    assert await second.next("connections.count") == {"count": 2}
    await first.next("connections.count", lambda d: d["count"] == 2)
    second.close()
    await js.wait_for(lambda: first.of("connections.count") == [{"count": 1}, {"count": 2},
                                                                 {"count": 1}])


async def test_ping_pong_and_acknowledgements(droid, api, js):
    user = await api.register()
    tab = js.open(events_url(droid), auth={"token": user["token"]})
    await tab.connected()
    [ack] = await tab.call("ping", {"message": "Hello"})
    pong = await tab.next("pong")
    assert ack == pong
    assert pong["message"] == "Hello" and pong["clientId"] == (await tab.record("connect"))["sid"]
    assert re.match(ISO_RE, pong["timestamp"])
    [subscribed] = await tab.call("subscribe.tasks")
    assert subscribed == await tab.next("subscribed.tasks")
    [unsubscribed] = await tab.call("unsubscribe.tasks")
    assert unsubscribed == await tab.next("unsubscribed.tasks")
    for reply in (subscribed, unsubscribed):
        assert set(reply) == {"userId", "timestamp", "message"} and reply["userId"] == user["id"]


async def test_unsubscribed_tab_gets_nothing_until_it_subscribes_again(droid_factory, js):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    quiet = js.open(events_url(app), auth={"token": user["token"]})
    other = js.open(events_url(app), auth={"token": user["token"]})
    await quiet.connected()
    await other.connected()
    await quiet.call("unsubscribe.tasks")
    first = (await api.post("/tasks", {"prompt": "one"}, token=user["token"])).body
    await other.next("task.event", lambda e: e["data"]["id"] == first["id"])
    await quiet.call("ping")  # a barrier: anything sent to this tab before would be here now
    assert quiet.of("task.created") == [] and quiet.of("task.event") == []
    await quiet.call("subscribe.tasks")
    second = (await api.post("/tasks", {"prompt": "two"}, token=user["token"])).body
    assert (await quiet.next("task.created"))["data"]["id"] == second["id"]
    await other.next("task.created", lambda e: e["data"]["id"] == second["id"])
    api.close()


# transports, isolation, task events -----------------------------------------------------------

async def test_polling_then_upgrade_and_websocket_only_both_get_the_task(droid, api, js):
    user = await api.register()
    upgrading = js.open(events_url(droid), auth={"token": user["token"]})
    direct = js.open(events_url(droid), auth={"token": user["token"]}, transports=["websocket"])
    await upgrading.connected()
    await direct.connected()
    assert (await upgrading.record("open"))["transport"] == "polling"
    assert (await upgrading.record("upgrade"))["transport"] == "websocket"
    assert (await direct.record("open"))["transport"] == "websocket"
    task = (await api.post("/tasks", {"prompt": "hi"}, token=user["token"])).body
    for sock in (upgrading, direct):
        done = await finished(sock, task["id"])
        assert done["data"]["response"]
    assert not [r for r in direct.records if r["type"] == "upgrade"]


async def test_a_second_user_receives_nothing_of_the_first(droid, api, js):
    alice, bob = await api.register(), await api.register()
    alices = js.open(events_url(droid), auth={"token": alice["token"]})
    bobs = js.open(events_url(droid), auth={"token": bob["token"]})
    await alices.connected()
    await bobs.connected()
    task = (await api.post("/tasks", {"prompt": "private"}, token=alice["token"])).body
    await finished(alices, task["id"])
    await bobs.call("ping")
    names = {r["name"] for r in bobs.records if r["type"] == "event"}
    assert names == {"connected", "connections.count", "pong"}


async def test_envelopes_and_order_of_one_task(droid, api, js):
    user = await api.register()
    tab = js.open(events_url(droid), auth={"token": user["token"]}, transports=["websocket"])
    await tab.connected()
    task = (await api.post("/tasks", {"prompt": "Write a haiku"}, token=user["token"])).body
    await finished(tab, task["id"])
    envelopes = tab.of("task.event")
    names = [e["event"] for e in envelopes]
    assert names[:2] == ["task.created", "task.processing"] and names[-1] == "task.completed"
    assert set(names[2:-1]) == {"task.progress"} and len(names) > 3
    for envelope in envelopes:
        check_envelope(envelope, envelope["event"], task["id"], user["id"])
        assert set(envelope["data"]) >= EVENT_FIELDS[envelope["event"]]
    created = envelopes[0]["data"]
    assert {k: created[k] for k in TASK_FIELDS} == task
    specific = [r["args"][0] for r in tab.records
                if r["type"] == "event" and r["name"] in EVENT_FIELDS]
    assert specific == envelopes


async def test_cancel_emits_task_cancelled(droid_factory, js):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    tab = js.open(events_url(app), auth={"token": user["token"]})
    await tab.connected()
    task = (await api.post("/tasks", {"prompt": "x"}, token=user["token"])).body
    assert (await api.post(f"/tasks/{task['id']}/cancel", token=user["token"])).status == 200
    cancelled = await finished(tab, task["id"], "task.cancelled")
    check_envelope(cancelled, "task.cancelled", task["id"], user["id"])
    assert await tab.next("task.cancelled") == cancelled
    api.close()


# latency --------------------------------------------------------------------------------------

@pytest.mark.parametrize("transports", [["websocket"], ["polling"]])
async def test_measure_rest_post_to_socket_latency(droid, api, js, transports):
    """Not a timing assertion: prints how long a POST /tasks takes to reach the owner's socket."""
    user = await api.register()
    tab = js.open(events_url(droid), auth={"token": user["token"]}, transports=transports)
    await tab.connected()
    js.send(cmd="post_and_time", id=tab.id, base=droid.url, token=user["token"], count=50)
    timings = (await tab.record("timings", timeout=25))["timings"]
    assert len(timings) == 50
    event = sorted(t["event"] for t in timings)
    response = sorted(t["response"] for t in timings)
    p95 = event[int(len(event) * 0.95) - 1]
    print(f"\nREST POST /tasks -> task.created on the owner's socket ({transports[0]}, 50 tasks): "
          f"median {statistics.median(event):.1f} ms, p95 {p95:.1f} ms, max {event[-1]:.1f} ms; "
          f"HTTP 201 median {statistics.median(response):.1f} ms")


# the original document's examples -------------------------------------------------------------

async def test_the_documents_node_client_class_runs_as_written(droid, api):
    user = await api.register()
    node = await Node.start("task_events_service.mjs", env={
        "DROID_EVENTS_URL": events_url(droid), "DROID_TOKEN": user["token"]})
    try:
        await node.wait_for(lambda: any("Connected to real-time events" in line
                                        for line in node.lines))
        task = (await api.post("/tasks", {"prompt": "from the doc"}, token=user["token"])).body
        await node.wait_for(lambda: any(line.startswith("Task completed") for line in node.lines))
    finally:
        await node.stop()
    output = "\n".join(node.lines)
    assert user["id"] in output and "Successfully connected to real-time events" in output
    for label in ("Task created", "Task processing", "Task completed"):
        assert f"{label} {{" in output, label
    assert f"taskId: '{task['id']}'" in output


class PageHandler(tornado.web.RequestHandler):
    """The document's browser example with only the URL and the token filled in, and the
    Socket.IO client served from here instead of from the CDN."""

    def initialize(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def get(self) -> None:
        page = (PAGES_DIR / "realtime.html").read_text()
        for placeholder, value in (("https://cdn.socket.io/4.5.4/socket.io.min.js",
                                    "/socket.io.min.js"),
                                   ("http://localhost:3000/events", self.url),
                                   ("YOUR_JWT_TOKEN", self.token)):
            assert placeholder in page
            page = page.replace(placeholder, value)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(page)


def socketio_bundle() -> Path:
    vendored = ROOT / "static" / "vendor" / "socket.io.min.js"
    if vendored.is_file():
        return vendored
    return JS_DIR / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"


async def test_the_documents_browser_page_runs_in_chromium(droid, api):
    from playwright.async_api import async_playwright

    assert Path(CHROMIUM).is_file(), "Chromium is not installed at /usr/bin/chromium"
    user = await api.register()
    bundle = socketio_bundle()
    pages = tornado.web.Application([
        (r"/", PageHandler, {"url": events_url(droid), "token": user["token"]}),
        (r"/(socket\.io\.min\.js)", tornado.web.StaticFileHandler, {"path": str(bundle.parent)}),
    ])
    sock, port = tornado.testing.bind_unused_port()
    server = HTTPServer(pages)
    server.add_sockets([sock])
    logs: list[tuple[str, list]] = []
    page_errors: list[str] = []
    changed = asyncio.Event()

    async def on_console(message) -> None:
        values = [await arg.json_value() for arg in message.args]
        logs.append((message.type, values))
        changed.set()

    async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                changed.clear()
                await changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def logged(label: str) -> list[list]:
        return [values[1:] for _, values in logs if values and values[0] == label]

    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=CHROMIUM_ARGS)
            page = await browser.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{port}/")
            await until(lambda: bool(logged("Connected:")))
            task = (await api.post("/tasks", {"prompt": "from the page"},
                                   token=user["token"])).body
            await until(lambda: any(v[0] == "task.completed" for v in logged("Task event:")))
            await browser.close()
    finally:
        server.stop()
    [connected] = logged("Connected:")
    assert connected[0]["userId"] == user["id"]
    assert [v[0]["id"] for v in logged("New task:")] == [task["id"]]
    assert [v[0]["taskId"] for v in logged("Task processing:")] == [task["id"]]
    [completed] = logged("Task completed:")
    assert completed[0]["taskId"] == task["id"] and completed[0]["response"]
    names = [v[0] for v in logged("Task event:")]
    assert names[:2] == ["task.created", "task.processing"] and names[-1] == "task.completed"
    # The example calls functions it never defines (displayResponse, handleTaskUpdate,
    # showError): those throw in its listeners, after the logging; nothing else may go wrong.
    assert set(page_errors) == {"displayResponse is not defined",
                                "handleTaskUpdate is not defined"}, page_errors
