"""API keys and webhooks through droid.client and the command line, against a real
`python -m droid` process, with a real webhook receiver on loopback whose deliveries
`verify_webhook` checks; `droid login` / `logout` in a pseudo-terminal.

These need the server side of issue 23 (POST /api-keys, /webhooks, ...): the REST shapes are
those of docs/contract.md, section 5."""
from __future__ import annotations

import asyncio
import http.server
import json
import re
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from cli_helpers import PASSWORD, cli_env, finish, register, run_cli, spawn_cli, start
from droid.client import (AsyncClient, Client, Conflict, Forbidden, NotFound, Unauthorized,
                          verify_webhook)
from droid_process import spawn  # noqa: F401  (fixture)

TIMEOUT = 30
KEY_RE = re.compile(r"^droid_sk_[A-Za-z0-9_-]{43}$")  # base64url of 32 bytes, no padding


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on loopback: keeps every request (headers, raw body) and answers
    `status` (200 by default)."""

    daemon_threads = True

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [r for r in self.received if predicate(r)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no such delivery: {self.received}"
            time.sleep(0.02)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server: Receiver = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.received.append({"path": self.path, "body": body, "headers": {
                name.lower(): value for name, value in self.headers.items()}})
        self.send_response(server.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def droid(spawn):
    # The receiver is on loopback, where webhooks may go only when allowed.
    return start(spawn, DROID_DEMO_DELAY_S="0.05", DROID_WEBHOOK_ALLOW_PRIVATE="true")


def test_api_keys_create_list_use_and_revoke(droid):
    user = register(droid.url)
    with Client(droid.url, token=user["token"]) as jwt_client:
        created = jwt_client.api_keys.create("laptop")
        assert KEY_RE.match(created["key"]), created["key"]
        assert created["prefix"] == created["key"][:len("droid_sk_") + 8]
        assert created["scope"] == "write" and created["lastUsedAt"] is None
        listed = jwt_client.api_keys.list()
        assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    with Client(droid.url, api_key=created["key"]) as key_client:
        assert key_client.auth.me()["id"] == user["id"]
        task = key_client.tasks.create("with a key")
        assert key_client.tasks.wait(task["id"], timeout=TIMEOUT)["status"] == "completed"
        seqs = []
        for envelope in key_client.events(after=0):  # SSE with the key too
            seqs.append(envelope["seq"])
            if envelope["event"] == "task.completed":
                break
        assert seqs == list(range(1, len(seqs) + 1))
        second = key_client.api_keys.create("ci", scope="read")  # a write key manages keys
        assert [k["name"] for k in key_client.api_keys.list()] == ["laptop", "ci"]
        assert key_client.api_keys.list()[0]["lastUsedAt"] is not None
        key_client.api_keys.revoke(second["id"])
        with pytest.raises(NotFound):
            key_client.api_keys.revoke(str(uuid.uuid4()))
        key_client.api_keys.revoke(created["id"])  # itself
        with pytest.raises(Unauthorized) as revoked:
            key_client.tasks.page()
        assert revoked.value.text == "Invalid API key"


def test_a_read_key_reads_and_does_not_write(droid):
    user = register(droid.url)
    with Client(droid.url, token=user["token"]) as owner:
        read = owner.api_keys.create("dashboard", scope="read")
        task = owner.tasks.create("visible")
    with Client(droid.url, api_key=read["key"]) as reader:
        assert reader.tasks.get(task["id"])["id"] == task["id"]
        assert reader.last_seq() >= 1
        with pytest.raises(Forbidden) as forbidden:
            reader.tasks.create("not allowed")
        assert forbidden.value.status_code == 403
        assert forbidden.value.text == "API key scope does not allow this"


def test_the_21st_api_key_is_a_conflict(droid):
    user = register(droid.url)
    with Client(droid.url, token=user["token"]) as client:
        for i in range(20):
            client.api_keys.create(f"k{i}")
        with pytest.raises(Conflict) as limit:
            client.api_keys.create("one too many")
    assert limit.value.text == "API key limit reached (20)"


def test_webhooks_every_method_and_verify_webhook_on_real_deliveries(droid, receiver):
    user = register(droid.url)
    with Client(droid.url, token=user["token"]) as client:
        endpoint = client.webhooks.create(receiver.url, description="ci")
        secret = endpoint["secret"]
        assert secret.startswith("whsec_") and endpoint["enabled"] is True
        assert endpoint["events"] == ["task.completed", "task.failed", "task.cancelled"]
        assert [w["id"] for w in client.webhooks.list()] == [endpoint["id"]]
        assert "secret" not in client.webhooks.get(endpoint["id"])

        test = client.webhooks.test(endpoint["id"])
        assert test["event"] == "webhook.test" and test["endpointId"] == endpoint["id"]
        got = receiver.wait_for(lambda r: b"webhook.test" in r["body"])
        payload = verify_webhook(got["headers"], got["body"], secret)
        assert payload["type"] == "webhook.test"

        task = client.tasks.create("deliver me")
        client.tasks.wait(task["id"], timeout=TIMEOUT)
        got = receiver.wait_for(lambda r: task["id"].encode() in r["body"])
        payload = verify_webhook(got["headers"], got["body"], secret)
        assert payload["type"] == "task.completed"
        assert payload["data"]["taskId"] == task["id"] and payload["data"]["seq"] >= 3

        deliveries = list(client.webhooks.deliveries(endpoint["id"]))
        assert {d["event"] for d in deliveries} == {"webhook.test", "task.completed"}
        done = list(client.webhooks.deliveries(endpoint["id"], status="succeeded", page_size=1))
        assert len(done) == 2 and done[0]["attempts"][0]["statusCode"] == 200
        retried = client.webhooks.retry(endpoint["id"], done[-1]["id"])
        assert retried["id"] == done[-1]["id"]
        page = client.webhooks.delivery_page(endpoint["id"], limit=1)
        assert len(page["items"]) == 1 and page["nextCursor"]

        rotated = client.webhooks.rotate_secret(endpoint["id"])
        assert rotated["secret"] != secret
        before = len(receiver.received)
        client.webhooks.test(endpoint["id"])
        got = receiver.wait_for(lambda r: receiver.received.index(r) >= before)
        assert len(got["headers"]["webhook-signature"].split(" ")) == 2  # both secrets sign
        verify_webhook(got["headers"], got["body"], rotated["secret"])
        verify_webhook(got["headers"], got["body"], secret)

        updated = client.webhooks.update(endpoint["id"], enabled=False, events=["task.failed"])
        assert updated["enabled"] is False and updated["events"] == ["task.failed"]
        client.webhooks.delete(endpoint["id"])
        with pytest.raises(NotFound):
            client.webhooks.get(endpoint["id"])
        for i in range(10):
            client.webhooks.create(f"{receiver.url}/{i}")
        with pytest.raises(Conflict):
            client.webhooks.create(f"{receiver.url}/11")


@pytest.mark.asyncio
async def test_async_client_api_keys_and_webhooks(spawn, receiver):
    droid = await spawn("droid", JWT_SECRET="x" * 40, DROID_ENV="test",
                        DROID_WEBHOOK_ALLOW_PRIVATE="true").ready()
    user = await asyncio.to_thread(register, droid.url)
    async with AsyncClient(droid.url, token=user["token"]) as client:
        key = await client.api_keys.create("async")
        assert [k["id"] for k in await client.api_keys.list()] == [key["id"]]
        endpoint = await client.webhooks.create(receiver.url, events=["task.completed"])
        assert (await client.webhooks.get(endpoint["id"]))["url"] == receiver.url
        assert len(await client.webhooks.list()) == 1
        delivery = await client.webhooks.test(endpoint["id"])
        got = await asyncio.to_thread(receiver.wait_for, lambda r: b"webhook.test" in r["body"])
        verify_webhook(got["headers"], got["body"], endpoint["secret"])
        assert [d["id"] async for d in client.webhooks.deliveries(endpoint["id"])] == \
            [delivery["id"]]
        assert (await client.webhooks.delivery_page(endpoint["id"]))["items"][0]["id"] == \
            delivery["id"]
        await client.webhooks.retry(endpoint["id"], delivery["id"])
        rotated = await client.webhooks.rotate_secret(endpoint["id"])
        assert rotated["secret"] != endpoint["secret"]
        assert (await client.webhooks.update(endpoint["id"], description="d"))["description"] \
            == "d"
        await client.webhooks.delete(endpoint["id"])
        await client.api_keys.revoke(key["id"])
        assert await client.api_keys.list() == []


# the command line ------------------------------------------------------------------------


def config_file(tmp_path: Path) -> Path:
    return tmp_path / "config" / "droid" / "config.json"


def test_cli_login_asks_creates_a_key_kept_0600_and_logout_revokes_it(tmp_path, droid):
    user = register(droid.url)
    env = cli_env(tmp_path, droid.url)
    child = spawn_cli(["login"], env)
    child.expect("E-mail: ", timeout=TIMEOUT)
    child.sendline(user["email"])
    child.expect("Password: ", timeout=TIMEOUT)
    child.sendline(PASSWORD)
    child.expect("Logged in to", timeout=TIMEOUT)
    assert finish(child) == 0
    assert PASSWORD not in child.logfile_read.getvalue()  # not echoed
    path = config_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert KEY_RE.match(saved["apiKey"]) and saved["url"] == droid.url

    piped = {k: v for k, v in env.items() if k != "DROID_URL"}  # all from the config file
    ran = run_cli(["run", "after login", "--json"], piped)
    assert ran.returncode == 0, ran.stderr
    keys = [json.loads(line) for line in run_cli(["keys", "ls", "--json"], piped)
            .stdout.splitlines()]
    assert [k["id"] for k in keys] == [saved["keyId"]]

    out = run_cli(["logout"], piped)
    assert out.returncode == 0 and "revoked" in out.stderr, out.stderr
    assert not path.exists()
    with Client(droid.url, api_key=saved["apiKey"]) as old:
        with pytest.raises(Unauthorized):
            old.tasks.page()
    after = run_cli(["tasks", "ls"], piped)
    assert after.returncode == 4 and "not logged in" in after.stderr


def test_cli_login_with_an_existing_key_and_a_revoked_key_exits_4(tmp_path, droid):
    user = register(droid.url)
    with Client(droid.url, token=user["token"]) as client:
        key = client.api_keys.create("existing")
    env = cli_env(tmp_path, droid.url)
    result = run_cli(["login", "--api-key", key["key"]], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(config_file(tmp_path).read_text())["apiKey"] == key["key"]
    assert run_cli(["tasks", "ls"], env).returncode == 0
    with Client(droid.url, token=user["token"]) as client:
        client.api_keys.revoke(key["id"])
    refused = run_cli(["tasks", "ls"], env)
    assert refused.returncode == 4
    assert refused.stderr.strip() == (f"droid: Invalid API key ({droid.url}): log in again with "
                                      "`droid login`, or set DROID_API_KEY")
    bad = run_cli(["login", "--api-key", "droid_sk_nope"], env)
    assert bad.returncode == 4 and "Invalid API key" in bad.stderr


def test_cli_keys_and_webhooks_commands(tmp_path, droid, receiver):
    user = register(droid.url)
    env = cli_env(tmp_path, droid.url, DROID_API_KEY=user["token"])
    created = run_cli(["keys", "create", "ci", "--scope", "read"], env)
    assert created.returncode == 0 and KEY_RE.match(created.stdout.strip()), created
    (listed,) = [json.loads(line) for line in run_cli(["keys", "ls", "--json"], env)
                 .stdout.splitlines()]
    assert listed["name"] == "ci" and listed["scope"] == "read"
    table = run_cli(["keys", "ls"], env).stdout
    assert table.splitlines()[0].split("\t")[:3] == ["ID", "NAME", "PREFIX"]
    assert run_cli(["keys", "revoke", listed["id"]], env).returncode == 0
    assert run_cli(["keys", "revoke", listed["id"]], env).returncode == 5

    added = run_cli(["webhooks", "add", receiver.url, "--event", "task.completed", "--json"], env)
    assert added.returncode == 0, added.stderr
    endpoint = json.loads(added.stdout)
    assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["task.completed"]
    ls = [json.loads(line) for line in run_cli(["webhooks", "ls", "--json"], env)
          .stdout.splitlines()]
    assert [w["id"] for w in ls] == [endpoint["id"]]
    tested = run_cli(["webhooks", "test", endpoint["id"]], env)
    assert tested.returncode == 0 and tested.stdout.startswith("delivery ")
    got = receiver.wait_for(lambda r: b"webhook.test" in r["body"])
    verify_webhook(got["headers"], got["body"], endpoint["secret"])
    deadline = time.monotonic() + TIMEOUT
    while True:
        rows = [json.loads(line) for line in run_cli(
            ["webhooks", "deliveries", endpoint["id"], "--json"], env).stdout.splitlines()]
        if rows and rows[0]["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert rows[0]["event"] == "webhook.test"
    human = run_cli(["webhooks", "deliveries", endpoint["id"], "--status", "succeeded"], env)
    assert "webhook.test\tsucceeded\t1\t200" in human.stdout, human.stdout
