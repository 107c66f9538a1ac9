"""droid.client against a real `python -m droid` process: every REST method of `Client` and
`AsyncClient`, typed errors carrying the error shape (401, 404, 409, 413, 429), the retry policy
(429/503 after Retry-After, within a limit) and timeouts against a scripted HTTP server on
loopback, `verify_webhook` against the standardwebhooks signer, and a client that imports
nothing of the server.

API keys and webhooks are in tests/test_client_keys_webhooks.py (they need issue 23)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from standardwebhooks.webhooks import Webhook

from conftest import TEST_SECRET
from droid.client import (AsyncClient, BadRequest, Client, Conflict, ConnectionFailed,
                          NotFound, PayloadTooLarge, RateLimited, ServiceUnavailable, Timeout,
                          Unauthorized, WebhookVerificationError, verify_webhook)
from droid_process import DroidProcess
from redis_server import free_port

PASSWORD = "correct horse"


def start_droid(base: Path, name: str = "droid", **env: Any) -> DroidProcess:
    # The demo agent takes half a second: long enough for a cancel right after a create.
    proc = DroidProcess(name, base / "work", base, {
        "JWT_SECRET": TEST_SECRET, "DROID_ENV": "test", "DROID_DEMO_DELAY_S": "0.5",
        "DROID_RETRY_BACKOFF_S": "0.05", **env})
    asyncio.run(proc.ready())
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[DroidProcess]:
    """One Droid process for the module's REST tests (each test registers its own user)."""
    base = tmp_path_factory.mktemp("client")
    proc = start_droid(base)
    try:
        yield proc
    finally:
        proc.kill()
        print(proc.output())


def new_user(url: str) -> dict:
    with Client(url) as anonymous:
        reply = anonymous.auth.register(f"u-{uuid.uuid4().hex[:10]}@example.com", PASSWORD)
    return {**reply["user"], "token": reply["accessToken"]}


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.url, token=new_user(server.url)["token"]) as c:
        yield c


def test_auth_register_login_and_me(server):
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    with Client(server.url) as anonymous:
        registered = anonymous.auth.register(email, PASSWORD, name="Ada")
        assert registered["tokenType"] == "Bearer" and registered["user"]["email"] == email
        logged_in = anonymous.auth.login(email, PASSWORD)
        with pytest.raises(Conflict) as taken:
            anonymous.auth.register(email, PASSWORD)
        assert taken.value.status_code == 409 and taken.value.body["statusCode"] == 409
        with pytest.raises(Unauthorized) as wrong:
            anonymous.auth.login(email, "not the password")
        assert wrong.value.text == "Invalid email or password"
        assert anonymous.health()["status"] == "ok"
    with Client(server.url, token=logged_in["accessToken"]) as me:
        assert me.auth.me() == registered["user"]


def test_tasks_create_get_page_list_cancel_and_wait(client):
    first = client.tasks.create("one", priority="urgent", metadata={"ticket": 7})
    assert first["status"] == "pending" and first["priority"] == "urgent"
    assert first["metadata"] == {"ticket": 7}
    assert client.tasks.get(first["id"])["id"] == first["id"]
    done = client.tasks.wait(first["id"], timeout=20)
    assert done["status"] == "completed" and "one" in done["response"]
    assert client.tasks.wait(first["id"], timeout=5) == done  # already finished: at once

    again = client.tasks.create("two", idempotency_key="k-1")
    assert client.tasks.create("two", idempotency_key="k-1")["id"] == again["id"]
    others = [client.tasks.create(f"t{i}") for i in range(3)]
    listed = list(client.tasks.list(page_size=2))  # three pages, followed by the iterator
    assert [t["id"] for t in listed] == [t["id"] for t in reversed([first, again, *others])]
    page = client.tasks.page(limit=2)
    assert len(page["items"]) == 2 and page["nextCursor"]
    assert first["id"] in [t["id"] for t in client.tasks.list(status="completed")]
    assert [t["id"] for t in client.tasks.list(status="cancelled")] == []

    slow = client.tasks.create("cancel me", agent=client.agents.list()[0]["id"])  # 0.5 s long
    cancelled = client.tasks.cancel(slow["id"])
    assert cancelled["status"] == "cancelled"
    assert client.tasks.wait(slow["id"], timeout=5)["status"] == "cancelled"


def test_tasks_stream_yields_the_pieces_then_the_finished_task(client):
    after = client.last_seq()
    task = client.tasks.create("stream it")
    items = list(client.tasks.stream(task["id"], after=after, timeout=20))
    pieces, final = items[:-1], items[-1]
    assert all(isinstance(p, str) for p in pieces) and len(pieces) >= 2, items
    assert final["status"] == "completed" and "".join(pieces) == final["response"]
    envelopes = list(client.tasks.watch(task["id"], after=after, timeout=5))
    assert envelopes == [final]  # finished already: the task alone


def test_agents_list_and_create(client):
    agents = client.agents.list()
    assert agents[0]["ownerId"] is None  # the built-in default agent comes first
    mine = client.agents.create("Poet", model="demo-model", system_prompt="Rhyme.",
                                description="writes verse")
    assert mine["name"] == "Poet" and mine["systemPrompt"] == "Rhyme."
    assert [a["id"] for a in client.agents.list()] == [agents[0]["id"], mine["id"]]
    task = client.tasks.create("hello", agent=mine["id"])
    assert task["agentId"] == mine["id"]


def test_events_page_and_last_seq(client):
    assert client.last_seq() == 0
    task = client.tasks.create("x")
    client.tasks.wait(task["id"], timeout=20)
    page = client.events_page(after=0)
    seqs = [e["seq"] for e in page["items"]]
    assert seqs == list(range(1, len(seqs) + 1)) and page["lastSeq"] == seqs[-1] >= 3
    assert client.last_seq() == seqs[-1]
    assert client.events_page(after=1, limit=1)["items"][0]["seq"] == 2


def test_typed_errors_carry_the_error_shape(server, client, monkeypatch):
    with Client(server.url, api_key="droid_sk_not-a-key") as stranger:
        with pytest.raises(Unauthorized) as unauthorized:
            stranger.tasks.get(str(uuid.uuid4()))
    assert unauthorized.value.status_code == 401 and unauthorized.value.error == "Unauthorized"
    monkeypatch.delenv("DROID_API_KEY", raising=False)
    with Client(server.url) as nobody:  # no credential at all
        with pytest.raises(Unauthorized) as anonymous:
            nobody.tasks.page()
    assert anonymous.value.text == "Authentication required"

    with pytest.raises(NotFound) as missing:
        client.tasks.get(str(uuid.uuid4()))
    assert missing.value.body == {"statusCode": 404, "error": "Not Found",
                                  "message": "Task not found"}

    task = client.tasks.create("finish first")
    client.tasks.wait(task["id"], timeout=20)
    with pytest.raises(Conflict) as conflict:
        client.tasks.cancel(task["id"])
    assert conflict.value.status_code == 409 and "completed" in conflict.value.text

    with pytest.raises(PayloadTooLarge) as too_large:
        client.tasks.create("x" * (1024 * 1024 + 1))
    assert too_large.value.status_code == 413 and too_large.value.body["statusCode"] == 413

    with pytest.raises(BadRequest) as invalid:
        client.tasks.create("ok", priority="whenever")
    assert invalid.value.status_code == 400 and "priority" in invalid.value.text


def test_429_is_rate_limited_with_retry_after(tmp_path):
    """One login a minute per address: the second is refused with Retry-After 60, more than
    the client waits (max_retry_wait 30 s): RateLimited at once, with retry_after."""
    proc = start_droid(tmp_path, DROID_AUTH_ATTEMPTS_PER_ADDRESS="1")
    try:
        with Client(proc.url) as anonymous:
            anonymous.auth.register("limited@example.com", PASSWORD)
            started = time.monotonic()
            with pytest.raises(RateLimited) as limited:
                anonymous.auth.login("limited@example.com", PASSWORD)
            assert time.monotonic() - started < 10
        assert limited.value.status_code == 429 and limited.value.body["statusCode"] == 429
        assert 50 <= limited.value.retry_after <= 60
        assert "Too many attempts" in limited.value.text
    finally:
        proc.kill()


class Scripted(http.server.ThreadingHTTPServer):
    """An HTTP server on loopback that answers from a script: (status, headers, body) or
    ("hang", seconds); every request's arrival time is kept."""

    daemon_threads = True

    def __init__(self, script: list[tuple]) -> None:
        self.script = list(script)
        self.arrivals: list[float] = []
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server: Scripted = self.server  # type: ignore[assignment]
        server.arrivals.append(time.monotonic())
        step = server.script.pop(0) if server.script else (200, {}, {"status": "ok"})
        if step[0] == "hang":
            time.sleep(step[1])
            return
        status, headers, body = step
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _error(status: int, error: str) -> dict:
    return {"statusCode": status, "error": error, "message": "try later"}


def test_429_and_503_are_retried_after_retry_after():
    server = Scripted([(503, {"Retry-After": "1"}, _error(503, "Service Unavailable")),
                       (429, {"Retry-After": "0"}, _error(429, "Too Many Requests"))])
    try:
        with Client(server.url) as client:
            assert client.health() == {"status": "ok"}
        assert len(server.arrivals) == 3
        assert server.arrivals[1] - server.arrivals[0] >= 0.95  # waited what Retry-After said
    finally:
        server.close()


def test_retries_stop_at_the_limit_and_at_a_long_retry_after():
    server = Scripted([(503, {"Retry-After": "0"}, _error(503, "Service Unavailable"))] * 5)
    try:
        with Client(server.url, max_retries=2) as client:
            with pytest.raises(ServiceUnavailable) as unavailable:
                client.health()
        assert unavailable.value.status_code == 503 and len(server.arrivals) == 3
    finally:
        server.close()
    server = Scripted([(429, {"Retry-After": "120"}, _error(429, "Too Many Requests"))])
    try:
        with Client(server.url) as client:
            with pytest.raises(RateLimited) as limited:
                client.health()
        assert limited.value.retry_after == 120 and len(server.arrivals) == 1
    finally:
        server.close()


def test_every_call_has_a_timeout():
    server = Scripted([("hang", 5)])
    try:
        with Client(server.url, timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(Timeout):
                client.health()
            assert time.monotonic() - started < 5 and len(server.arrivals) == 1
    finally:
        server.close()


def test_an_unreachable_server_is_connection_failed_after_retries():
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", max_retries=1) as client:
        with pytest.raises(ConnectionFailed) as failed:
            client.health()
    assert f"127.0.0.1:{port}" in str(failed.value) and "refused" in str(failed.value)


def test_url_and_key_come_from_the_environment(server, monkeypatch):
    user = new_user(server.url)
    monkeypatch.setenv("DROID_URL", server.url)
    monkeypatch.setenv("DROID_API_KEY", user["token"])
    with Client() as client:
        assert client.base_url == server.url and client.auth.me()["id"] == user["id"]
    with pytest.raises(ValueError):
        Client("ftp://example.com")


@pytest.mark.asyncio
async def test_async_client_has_the_same_methods(server):
    user = await asyncio.to_thread(new_user, server.url)
    async with AsyncClient(server.url, token=user["token"]) as client:
        assert (await client.auth.me())["id"] == user["id"]
        assert (await client.health())["status"] == "ok"
        agent = await client.agents.create("Async")
        assert (await client.agents.list())[-1]["id"] == agent["id"]
        after = await client.last_seq()
        task = await client.tasks.create("async", agent=agent["id"], priority="low")
        assert (await client.tasks.get(task["id"]))["priority"] == "low"
        items = [item async for item in client.tasks.stream(task["id"], after=after, timeout=20)]
        assert items[-1]["status"] == "completed"
        assert "".join(items[:-1]) == items[-1]["response"]
        assert (await client.tasks.wait(task["id"], timeout=5))["status"] == "completed"
        other = await client.tasks.create("cancel")
        assert (await client.tasks.cancel(other["id"]))["status"] == "cancelled"
        assert [t["id"] async for t in client.tasks.list(page_size=1)] == [other["id"], task["id"]]
        assert len((await client.tasks.page(limit=1))["items"]) == 1
        page = await client.events_page(after=0)
        assert page["lastSeq"] == await client.last_seq()
        with pytest.raises(NotFound):
            await client.tasks.get(str(uuid.uuid4()))
        with pytest.raises(Conflict):
            await client.tasks.cancel(other["id"])


def test_the_client_and_the_command_line_import_nothing_of_the_server():
    code = ("import sys, droid.client, droid.cli\n"
            "server = {'tornado', 'pymongo', 'openai', 'socketio', 'engineio', 'argon2', "
            "'redis', 'jwt', 'prometheus_client', 'pydantic', 'orjson', 'bson'}\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & server)\n"
            "mine = sorted(m for m in sys.modules if m.startswith('droid.') and not "
            "m.startswith(('droid.client', 'droid.cli')))\n"
            "print(loaded, mine)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[] []", result.stdout


# verify_webhook ------------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def signed(body: bytes, secret: str = SECRET, *, at: dt.datetime | None = None,
           msg_id: str = "msg_1") -> dict[str, str]:
    at = at or dt.datetime.now(dt.timezone.utc)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, at, body)}


def test_verify_webhook_accepts_what_standardwebhooks_signs():
    body = json.dumps({"type": "task.completed", "timestamp": "2026-01-01T00:00:00.000Z",
                       "data": {"taskId": "t1", "seq": 4}}).encode()
    headers = signed(body)
    assert verify_webhook(headers, body, SECRET)["data"] == {"taskId": "t1", "seq": 4}
    # Header names in any case, the body as text, and two signatures (a rotation) of which
    # the second is this secret's.
    titled = {k.title(): v for k, v in headers.items()}
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    titled["Webhook-Signature"] = f"{signed(body, other)['webhook-signature']} " \
                                  f"{headers['webhook-signature']}"
    assert verify_webhook(titled, body.decode(), SECRET)["type"] == "task.completed"


@pytest.mark.parametrize("case", ["tampered body", "other secret", "too old", "no signature",
                                  "not json", "bad secret"])
def test_verify_webhook_refuses(case):
    body = b'{"type":"task.failed","data":{}}'
    headers, secret = signed(body), SECRET
    if case == "tampered body":
        body = body.replace(b"failed", b"completed")
    elif case == "other secret":
        secret = "whsec_" + base64.b64encode(b"x" * 32).decode()
    elif case == "too old":
        headers = signed(body, at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=6))
    elif case == "no signature":
        del headers["webhook-signature"]
    elif case == "not json":
        body = b"not json"
        headers = signed(body)
    else:
        secret = "whsec_***"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, secret)
